// Cost of a keyed MAC over the AFD payloads, for the MESHPOST_AUTH_PAYLOAD decision
// (docs/security.md). Per AFD round trip and server, tcp moves one push of uint8[128,7168]
// (+16 B) and one response of bf16[128,7168]; with payload MACs the sender tags and the
// receiver checks each, so the critical path gains 2 x (push + response) bytes of MAC.
// Prints the median of `reps` timed runs per algorithm (interleaved), in us and GB/s.
#include <sodium.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

double NowUs() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (sodium_init() < 0) return 1;
  const int reps = argc > 1 ? std::atoi(argv[1]) : 51;
  const size_t push = 128 * 7168 + 16, response = 128 * 7168 * 2;
  std::vector<unsigned char> buf(response);
  randombytes_buf(buf.data(), buf.size());
  unsigned char key[32];
  randombytes_buf(key, sizeof(key));
  struct Algo {
    const char* name;
    void (*mac)(const unsigned char* key, const unsigned char* p, size_t n, unsigned char* out);
  };
  const Algo algos[] = {
      {"poly1305 (crypto_onetimeauth)",
       [](const unsigned char* k, const unsigned char* p, size_t n, unsigned char* out) {
         crypto_onetimeauth(out, p, n, k);
       }},
      {"blake2b-256 keyed (crypto_generichash)",
       [](const unsigned char* k, const unsigned char* p, size_t n, unsigned char* out) {
         crypto_generichash(out, 32, p, n, k, 32);
       }},
      {"hmac-sha256 (crypto_auth_hmacsha256)",
       [](const unsigned char* k, const unsigned char* p, size_t n, unsigned char* out) {
         crypto_auth_hmacsha256(out, p, n, k);
       }},
  };
  std::vector<std::vector<double>> us(3);
  unsigned char out[64];
  for (int r = 0; r < reps; ++r) {
    for (int a = 0; a < 3; ++a) {
      const double t0 = NowUs();
      algos[a].mac(key, buf.data(), push, out);
      algos[a].mac(key, buf.data(), response, out);
      us[a].push_back(NowUs() - t0);
    }
  }
  std::printf("payload per round trip and server: push %zu B + response %zu B\n", push, response);
  for (int a = 0; a < 3; ++a) {
    const double m = Median(us[a]);
    std::printf("%-40s median %8.1f us per side (tag or check), %5.2f GB/s; x2 sides = %8.1f us\n",
                algos[a].name, m, (push + response) / m / 1000.0, 2 * m);
  }
  return 0;
}
