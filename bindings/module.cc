// meshpost._meshpost: the Postoffice, AFTensorWorker and AFTensorServer as one `Node`
// class for Python. Every call that can block releases the GIL. Resumable waits (wait,
// get_batch) run in slices of <= 100 ms and check for Ctrl-C between slices; calls that
// cannot be resumed (start, barrier, stop) run on a helper thread the caller polls the
// same way. The Python package (meshpost/, fserver_lib.py) builds the friendly API on top.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bindings/errors.h"
#include "bindings/torch_interop.h"
#include "common/clock.h"
#include "ps/postoffice.h"
#include "tensor/device_backend.h"
#include "tensor/shared_memory.h"
#include "van/registry.h"

namespace py = pybind11;

namespace meshpost::py_bindings {
namespace {

constexpr int64_t kSliceMs = 100;

Result<Options> OptionsFromMap(const std::map<std::string, std::string>& env) {
  std::vector<std::string> names;
  names.reserve(env.size());
  for (const auto& [name, value] : env) names.push_back(name);
  return OptionsFromEnv(
      [&env](const char* name) -> const char* {
        auto it = env.find(name);
        return it == env.end() ? nullptr : it->second.c_str();
      },
      names);
}

// The option table, for meshpost._options (keywords) and the docs check.
py::list OptionTableForPython() {
  py::list out;
  for (const OptionSpec& o : OptionTable()) {
    out.append(py::make_tuple(o.variable, o.keyword, OptionGroupName(o.group), o.default_value,
                              o.valid, o.meaning));
  }
  return out;
}

std::string TypeName(py::handle obj) { return Py_TYPE(obj.ptr())->tp_name; }

// A list/tuple of items; a lone tensor or string is refused (both are sequences).
std::vector<py::object> ItemsOf(py::handle seq, const std::string& where, const char* expected) {
  if (IsTensor(seq) || PyUnicode_Check(seq.ptr()) || PyBytes_Check(seq.ptr()) ||
      !PySequence_Check(seq.ptr())) {
    RaiseTypeError(where + " is a " + TypeName(seq) + "; expected a list of " + expected);
  }
  py::sequence s = py::reinterpret_borrow<py::sequence>(seq);
  std::vector<py::object> items;
  items.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) items.push_back(s[i]);
  return items;
}

std::vector<TensorView> TensorsOf(py::handle seq, const std::string& where) {
  std::vector<TensorView> views;
  const std::vector<py::object> items = ItemsOf(seq, where, "torch.Tensor");
  views.reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    views.push_back(ViewFromTensor(items[i], where + "[" + std::to_string(i) + "]"));
  }
  return views;
}

int64_t IntOf(py::handle obj, const std::string& where) {
  if (PyBool_Check(obj.ptr()) || !PyIndex_Check(obj.ptr())) {
    RaiseTypeError(where + " is a " + TypeName(obj) + "; expected an int");
  }
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0) RaiseValueError(where + " does not fit in 64 bits");
  return static_cast<int64_t>(v);
}

std::vector<int64_t> IntsOf(py::handle seq, const std::string& where) {
  std::vector<int64_t> out;
  const std::vector<py::object> items = ItemsOf(seq, where, "int");
  out.reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    out.push_back(IntOf(items[i], where + "[" + std::to_string(i) + "]"));
  }
  return out;
}

// Keys are non-negative (the core refuses others): checked here so the message names the
// Python argument.
std::vector<int64_t> KeysOf(py::handle seq, const std::string& where) {
  std::vector<int64_t> keys = IntsOf(seq, where);
  for (size_t i = 0; i < keys.size(); ++i) {
    if (keys[i] < 0) {
      RaiseValueError(where + "[" + std::to_string(i) + "]=" + std::to_string(keys[i]) +
                      "; expected a key >= 0");
    }
  }
  return keys;
}

uint64_t HandleOf(int64_t handle, const char* fn) {
  if (handle <= 0) {
    RaiseStatus(NotFoundError(std::string(fn) + ": handler=" + std::to_string(handle) +
                              "; expected a handle returned by meshpost (a positive int)"));
  }
  return static_cast<uint64_t>(handle);
}

void CheckLengths(size_t a, const char* a_name, size_t b, const char* b_name, const char* fn) {
  if (a != b) {
    RaiseValueError(std::string(fn) + ": " + a_name + " has " + std::to_string(a) +
                    " entries but " + b_name + " has " + std::to_string(b) +
                    "; expected equal lengths");
  }
}

// Milliseconds left before `deadline` for the next slice (kSliceMs at most).
int64_t NextSlice(int64_t timeout_ms, uint64_t deadline) {
  if (timeout_ms < 0) return kSliceMs;
  const uint64_t now = GetNanosecond();
  if (now >= deadline) return 0;
  return std::min<int64_t>(kSliceMs, static_cast<int64_t>((deadline - now + 999999) / 1000000));
}

void CheckSignals() {
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

// Result of a call running on a helper thread.
struct AsyncCall {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  Status status;
  std::string name;
};

class Node {
 public:
  explicit Node(const std::map<std::string, std::string>& env) {
    auto opts = OptionsFromMap(env);
    if (!opts.ok()) RaiseStatus(opts.status());
    auto po = Postoffice::Create(*opts);
    if (!po.ok()) RaiseStatus(po.status());
    po_ = std::shared_ptr<Postoffice>(std::move(po).value());
  }

  ~Node() {
    if (!po_) return;
    // Destroying a running Postoffice leaves the cluster and joins threads; those may need
    // the GIL to free tensors they still hold, so never hold it here.
    if (Py_IsInitialized() && PyGILState_Check()) {
      py::gil_scoped_release release;
      po_.reset();
    } else {
      po_.reset();
    }
  }

  void Start() {
    Postoffice* po = Require("start", false);
    if (started_) RaiseStatus(FailedPreconditionError("start: the node is already started"));
    ThrowIfError(RunInterruptible("start", [po] { return po->Start(); }));
    started_ = true;
  }

  void Stop(int64_t timeout_ms) {
    if (!po_ || stopped_) return;
    if (busy_ && !busy_->done) {
      // An interrupted start/barrier still runs on its helper thread; it owns the node now.
      po_.reset();
      stopped_ = true;
      return;
    }
    Postoffice* po = po_.get();
    stopped_ = true;
    Status s = RunInterruptible("stop", [po, timeout_ms] { return po->Stop(timeout_ms); });
    ThrowIfError(s);
  }

  // Stops (if needed) and frees the node. Safe to call twice.
  void Close(int64_t timeout_ms) {
    if (!po_) return;
    Status first;
    if (!stopped_ && !(busy_ && !busy_->done)) {
      Postoffice* po = po_.get();
      py::gil_scoped_release release;
      first = po->Stop(timeout_ms);
    }
    stopped_ = true;
    {
      py::gil_scoped_release release;
      po_.reset();
    }
    registered_.clear();
    ThrowIfError(first);
  }

  void Barrier(int mask, int64_t timeout_ms) {
    Postoffice* po = Require("barrier", true);
    ThrowIfError(RunInterruptible(
        "barrier", [po, mask, timeout_ms] { return po->Barrier(mask, timeout_ms); }));
  }

  // --- worker ---

  int64_t PushPull(py::handle push_tensors, py::handle push_keys, py::handle pull_tensors,
                   py::handle pull_keys, std::optional<uint64_t> stream) {
    AFTensorWorker* w = RequireWorker("push_pull");
    std::vector<TensorView> push = TensorsOf(push_tensors, "push_pull: push_tensors");
    std::vector<int64_t> pkeys = KeysOf(push_keys, "push_pull: push_keys");
    std::vector<TensorView> pull = TensorsOf(pull_tensors, "push_pull: pull_tensors");
    std::vector<int64_t> lkeys = KeysOf(pull_keys, "push_pull: pull_keys");
    CheckLengths(push.size(), "push_tensors", pkeys.size(), "push_keys", "push_pull");
    CheckLengths(pull.size(), "pull_tensors", lkeys.size(), "pull_keys", "push_pull");
    KeyTensorBatch push_batch(push.size()), pull_batch(pull.size());
    for (size_t i = 0; i < push.size(); ++i) push_batch[i] = {pkeys[i], std::move(push[i])};
    for (size_t i = 0; i < pull.size(); ++i) pull_batch[i] = {lkeys[i], std::move(pull[i])};
    Result<uint64_t> h = UnavailableError("unset");
    {
      py::gil_scoped_release release;
      h = w->ZBatchPushPull(push_batch, pull_batch, SyncOf(stream));
      // Our references to the tensors drop here, without the GIL, like the van's do.
      push_batch.clear();
      pull_batch.clear();
    }
    if (!h.ok()) RaiseStatus(h.status());
    return static_cast<int64_t>(*h);
  }

  // need_event: the caller passes its current CUDA stream; None means no event.
  static StreamSync SyncOf(const std::optional<uint64_t>& stream) {
    return stream ? StreamSync{true, static_cast<DeviceStream>(*stream)} : StreamSync{};
  }

  void WaitOnStream(int64_t handle, uint64_t stream) {
    AFTensorWorker* w = RequireWorker("wait_on_stream");
    const uint64_t h = HandleOf(handle, "wait_on_stream");
    ThrowIfError(w->WaitOnStream(h, static_cast<DeviceStream>(stream)));
  }

  void Wait(int64_t handle, int64_t timeout_ms) {
    AFTensorWorker* w = RequireWorker("wait");
    const uint64_t h = HandleOf(handle, "wait");
    const uint64_t deadline = DeadlineFromTimeoutMs(timeout_ms);
    for (;;) {
      const int64_t slice = NextSlice(timeout_ms, deadline);
      Status s;
      {
        py::gil_scoped_release release;
        s = w->Wait(h, slice);
      }
      if (s.code() != StatusCode::kDeadlineExceeded) {
        ThrowIfError(s);
        return;
      }
      if (timeout_ms >= 0 && GetNanosecond() >= deadline) {
        RaiseStatus(DeadlineExceededError(
            "wait: handler " + std::to_string(h) + " did not complete within timeout_ms=" +
            std::to_string(timeout_ms) + "; the request stays pending and may be waited on again"));
      }
      CheckSignals();
    }
  }

  bool Done(int64_t handle) {
    AFTensorWorker* w = RequireWorker("done");
    const uint64_t h = HandleOf(handle, "done");
    // Core locks may be held by a van thread that frees a tensor (needing the GIL).
    auto r = [&] {
      py::gil_scoped_release release;
      return w->Done(h);
    }();
    if (!r.ok()) RaiseStatus(r.status());
    return *r;
  }

  std::vector<uint64_t> GetAllHandlers(int64_t handle) {
    AFTensorWorker* w = RequireWorker("get_all_handlers");
    const uint64_t h = HandleOf(handle, "get_all_handlers");
    // Core locks may be held by a van thread that frees a tensor (needing the GIL).
    auto r = [&] {
      py::gil_scoped_release release;
      return w->GetAllHandlers(h);
    }();
    if (!r.ok()) RaiseStatus(r.status());
    return *r;
  }

  std::vector<std::array<uint64_t, 8>> FetchTraces(int64_t handle) {
    AFTensorWorker* w = RequireWorker("fetch_trace");
    const uint64_t h = HandleOf(handle, "fetch_trace");
    // Core locks may be held by a van thread that frees a tensor (needing the GIL).
    auto r = [&] {
      py::gil_scoped_release release;
      return w->FetchTrace(h);
    }();
    if (!r.ok()) RaiseStatus(r.status());
    std::vector<std::array<uint64_t, 8>> out;
    for (const Trace& t : *r) out.push_back(t.ToArray());
    return out;
  }

  // StepMesh's fetch_trace(id): the 8 stamps of the request that carried id's tensors.
  std::array<uint64_t, 8> FetchTrace(int64_t handle) {
    AFTensorWorker* w = RequireWorker("fetch_trace");
    const uint64_t h = HandleOf(handle, "fetch_trace");
    auto r = [&] {
      py::gil_scoped_release release;
      return w->FetchRequestTrace(h);
    }();
    if (!r.ok()) RaiseStatus(r.status());
    return r->ToArray();
  }

  // --- server ---

  // [(handle, worker_rank, [tensors], [keys])], one per worker in rank order.
  py::list GetBatch(int64_t timeout_ms) {
    AFTensorServer* s = RequireServer("get_batch");
    const uint64_t deadline = DeadlineFromTimeoutMs(timeout_ms);
    std::vector<BatchRequest> batch;
    for (;;) {
      const int64_t slice = NextSlice(timeout_ms, deadline);
      Result<std::vector<BatchRequest>> r = UnavailableError("unset");
      {
        py::gil_scoped_release release;
        r = s->GetBatch(slice);
      }
      if (r.ok()) {
        batch = std::move(r).value();
        break;
      }
      if (r.status().code() != StatusCode::kDeadlineExceeded) RaiseStatus(r.status());
      if (timeout_ms >= 0 && GetNanosecond() >= deadline) {
        // The core's message describes the last slice ("after N ms"); keep what it waits for.
        const std::string& why = r.status().message();
        const size_t cut = why.find("; ");
        RaiseStatus(DeadlineExceededError(
            "get_batch: no complete batch within timeout_ms=" + std::to_string(timeout_ms) + "; " +
            (cut == std::string::npos ? why : why.substr(cut + 2))));
      }
      CheckSignals();
    }
    py::list out;
    for (BatchRequest& req : batch) {
      py::list tensors, keys;
      for (KeyTensor& kt : req.push) {
        std::shared_ptr<const void> keep = kt.tensor.owner;
        if (!keep) keep = RegisteredOwner(kt.tensor);
        tensors.append(TensorFromView(kt.tensor, std::move(keep)));
        keys.append(kt.key);
      }
      out.append(py::make_tuple(static_cast<int64_t>(req.handle), req.worker_rank, tensors, keys));
    }
    return out;
  }

  void Respond(py::handle tensors, int64_t handle, std::optional<uint64_t> stream) {
    AFTensorServer* s = RequireServer("respond");
    const uint64_t h = HandleOf(handle, "respond");
    std::vector<TensorView> views = TensorsOf(tensors, "respond: tensors");
    Status st;
    {
      py::gil_scoped_release release;
      st = s->Respond(h, views, SyncOf(stream));
      views.clear();
    }
    ThrowIfError(st);
  }

  void RespondVec(py::handle ret_buffer, py::handle tensors_vec, py::handle handler_vec,
                  std::optional<uint64_t> stream) {
    AFTensorServer* s = RequireServer("respond_vec");
    std::vector<TensorView> ret = {ViewFromTensor(ret_buffer, "respond_vec: ret_buffer")};
    std::vector<TensorView> views = TensorsOf(tensors_vec, "respond_vec: tensors_vec");
    std::vector<int64_t> hs = IntsOf(handler_vec, "respond_vec: handler_vec");
    CheckLengths(views.size(), "tensors_vec", hs.size(), "handler_vec", "respond_vec");
    std::vector<uint64_t> handles;
    for (int64_t h : hs) handles.push_back(HandleOf(h, "respond_vec"));
    Status st;
    {
      py::gil_scoped_release release;
      st = s->RespondVec(ret[0], views, handles, SyncOf(stream));
      ret.clear();
      views.clear();
    }
    ThrowIfError(st);
  }

  void RegisterRecvBuffer(py::handle tensor, py::handle worker_ranks, py::handle push_keys) {
    AFTensorServer* s = RequireServer("register_recv_buffer");
    TensorView v = ViewFromTensor(tensor, "register_recv_buffer: tensor");
    std::vector<int64_t> ranks64 = IntsOf(worker_ranks, "register_recv_buffer: worker_ranks");
    std::vector<int64_t> keys = KeysOf(push_keys, "register_recv_buffer: push_keys");
    std::vector<int> ranks;
    for (size_t i = 0; i < ranks64.size(); ++i) {
      if (ranks64[i] < 0 || ranks64[i] > (1 << 20)) {
        RaiseValueError("register_recv_buffer: worker_ranks[" + std::to_string(i) +
                        "]=" + std::to_string(ranks64[i]) + "; expected a worker rank");
      }
      ranks.push_back(static_cast<int>(ranks64[i]));
    }
    Status st;
    {
      py::gil_scoped_release release;
      st = s->RegisterRecvBuffer(v, ranks, keys);
    }
    ThrowIfError(st);
    registered_.push_back(std::move(v));
  }

  // [(key, dtype name, shape, nbytes)] of a pending request's pull slots.
  py::list PullSlots(int64_t handle) {
    AFTensorServer* s = RequireServer("pull_slots");
    const uint64_t h = HandleOf(handle, "pull_slots");
    // Core locks may be held by a van thread that frees a tensor (needing the GIL).
    auto r = [&] {
      py::gil_scoped_release release;
      return s->PullSlots(h);
    }();
    if (!r.ok()) RaiseStatus(r.status());
    py::list out;
    for (const PullSlot& slot : *r) {
      out.append(
          py::make_tuple(slot.key, std::string(DTypeName(slot.dtype)), slot.shape, slot.nbytes));
    }
    return out;
  }

  // Writable views of a pending request's pull slots in the worker's shared memory, None
  // for a slot that is not (BatchRequest::outputs).
  py::list Outputs(int64_t handle) {
    AFTensorServer* s = RequireServer("outputs");
    const uint64_t h = HandleOf(handle, "outputs");
    auto r = [&] {
      py::gil_scoped_release release;
      return s->Outputs(h);
    }();
    if (!r.ok()) RaiseStatus(r.status());
    py::list out;
    for (const TensorView& v : *r) {
      if (v.data == nullptr) {
        out.append(py::none());
      } else {
        out.append(TensorFromView(v, v.owner));
      }
    }
    return out;
  }

  // --- info ---

  std::string role() const { return RoleName(Info()->role()); }
  int rank() const { return Info()->rank(); }
  int port() const { return Info()->port(); }
  int num_workers() const { return Info()->options().num_workers; }
  int num_servers() const { return Info()->options().num_servers; }
  bool started() const { return started_ && !stopped_; }
  std::map<std::string, std::string> Transports() const { return Info()->Transports(); }

 private:
  const Postoffice* Info() const {
    if (!po_) RaiseStatus(FailedPreconditionError("the node is closed"));
    return po_.get();
  }

  Postoffice* Require(const char* fn, bool must_be_running) {
    if (!po_ || stopped_) {
      RaiseStatus(FailedPreconditionError(std::string(fn) + ": the node is stopped"));
    }
    if (busy_ && !busy_->done) {
      RaiseStatus(FailedPreconditionError(std::string(fn) + ": an interrupted " + busy_->name +
                                          " is still running on this node"));
    }
    if (must_be_running && !started_) {
      RaiseStatus(FailedPreconditionError(std::string(fn) +
                                          ": the node is not started; call init()/start() first"));
    }
    return po_.get();
  }

  AFTensorWorker* RequireWorker(const char* fn) {
    Postoffice* po = Require(fn, true);
    if (po->worker() == nullptr) {
      RaiseStatus(FailedPreconditionError(std::string(fn) + ": this node is a " +
                                          RoleName(po->role()) + "; only workers may call it"));
    }
    return po->worker();
  }

  AFTensorServer* RequireServer(const char* fn) {
    Postoffice* po = Require(fn, true);
    if (po->server() == nullptr) {
      RaiseStatus(FailedPreconditionError(std::string(fn) + ": this node is a " +
                                          RoleName(po->role()) + "; only servers may call it"));
    }
    return po->server();
  }

  // The registration whose bytes contain `view` (registered buffers have no van owner).
  std::shared_ptr<const void> RegisteredOwner(const TensorView& view) const {
    const char* p = static_cast<const char*>(view.data);
    for (const TensorView& r : registered_) {
      const char* base = static_cast<const char*>(r.data);
      if (p >= base && p + view.nbytes() <= base + r.nbytes()) return r.owner;
    }
    return nullptr;
  }

  // Runs a call that cannot be resumed on a helper thread and polls it in slices, so
  // Ctrl-C raises KeyboardInterrupt here. The helper keeps the Postoffice alive; after an
  // interrupt the node refuses further calls until the helper finished.
  Status RunInterruptible(const char* name, std::function<Status()> fn) {
    auto call = std::make_shared<AsyncCall>();
    call->name = name;
    std::shared_ptr<Postoffice> keep = po_;
    std::thread([call, fn = std::move(fn), keep]() mutable {
      Status s = fn();
      {
        std::lock_guard<std::mutex> lock(call->mu);
        call->status = std::move(s);
        call->done = true;
      }
      call->cv.notify_all();
      // Release the Postoffice (possibly the last reference) without holding call->mu.
      keep.reset();
    }).detach();
    for (;;) {
      {
        py::gil_scoped_release release;
        std::unique_lock<std::mutex> lock(call->mu);
        if (call->cv.wait_for(lock, std::chrono::milliseconds(kSliceMs),
                              [&] { return call->done; })) {
          return call->status;
        }
      }
      if (PyErr_CheckSignals() != 0) {
        busy_ = call;
        throw py::error_already_set();
      }
    }
  }

  std::shared_ptr<Postoffice> po_;
  bool started_ = false;
  bool stopped_ = false;
  std::shared_ptr<AsyncCall> busy_;
  std::vector<TensorView> registered_;  // owners keep registered tensors alive
};

// The CUDA primitives behind fserver_lib's GPU API, on raw addresses and streams (the
// Python side checks tensors). Each raises with the backend's reason when CUDA is unusable.
void BindCuda(py::module_& m) {
  m.def("built_with_cuda", &BuiltWithCuda);
  m.def(
      "cuda_status",
      [] {
        Status s = CudaBackend()->Available();
        return py::make_tuple(s.ok(), s.message());
      },
      "(usable, reason): whether this process can move CUDA tensors, and why not.");
  m.def(
      "cuda_write_flag",
      [](uint64_t flag, int64_t value, uint64_t value_addr, uint64_t stream) {
        ThrowIfError(CudaBackend()->WriteFlagAsync(reinterpret_cast<int64_t*>(flag), value,
                                                   reinterpret_cast<const int64_t*>(value_addr),
                                                   static_cast<DeviceStream>(stream)));
      },
      py::arg("flag"), py::arg("value"), py::arg("value_addr"), py::arg("stream"));
  m.def(
      "cuda_wait_flag",
      [](uint64_t flag, int64_t value, uint64_t value_addr, uint64_t stream) {
        ThrowIfError(CudaBackend()->WaitFlagAsync(reinterpret_cast<const int64_t*>(flag), value,
                                                  reinterpret_cast<const int64_t*>(value_addr),
                                                  static_cast<DeviceStream>(stream)));
      },
      py::arg("flag"), py::arg("value"), py::arg("value_addr"), py::arg("stream"));
  m.def(
      "cuda_seq_add_one",
      [](uint64_t counter, uint64_t stream) {
        ThrowIfError(CudaBackend()->IncrementAsync(reinterpret_cast<int64_t*>(counter),
                                                   static_cast<DeviceStream>(stream)));
      },
      py::arg("counter"), py::arg("stream"));
  m.def(
      "host_write_flag",
      [](uint64_t flag, int64_t value) {
        if (flag == 0) RaiseStatus(InvalidArgumentError("host_write_flag: flag address is 0"));
        __atomic_store_n(reinterpret_cast<int64_t*>(flag), value, __ATOMIC_RELEASE);
      },
      py::arg("flag"), py::arg("value"));
  m.def(
      "host_read_flag",
      [](uint64_t flag) {
        if (flag == 0) RaiseStatus(InvalidArgumentError("host_read_flag: flag address is 0"));
        return __atomic_load_n(reinterpret_cast<const int64_t*>(flag), __ATOMIC_ACQUIRE);
      },
      py::arg("flag"));
  m.def(
      "map_pinned_tensor",
      [](py::handle tensor, int64_t device_index) {
        if (!IsTensor(tensor)) {
          RaiseStatus(InvalidArgumentError("map_pinned_tensor: tensor is not a torch.Tensor"));
        }
        const uint64_t ptr = tensor.attr("data_ptr")().cast<uint64_t>();
        auto dev = CudaBackend()->HostDevicePointer(reinterpret_cast<void*>(ptr));
        if (!dev.ok()) RaiseStatus(dev.status().Annotate("map_pinned_tensor"));
        return MapPinnedTensor(tensor, device_index, *dev);
      },
      py::arg("tensor"), py::arg("device_index"));
}

}  // namespace
}  // namespace meshpost::py_bindings

PYBIND11_MODULE(_meshpost, m) {
  using meshpost::py_bindings::Node;
  m.doc() = "meshpost C++ core bindings; use the meshpost package or fserver_lib instead.";
  m.attr("SCHEDULER_GROUP") = meshpost::kSchedulerGroup;
  m.attr("SERVER_GROUP") = meshpost::kServerGroup;
  m.attr("WORKER_GROUP") = meshpost::kWorkerGroup;
  m.def(
      "get_nanosecond", [] { return meshpost::GetNanosecond(); },
      "Monotonic nanoseconds on the clock used for trace stamps.");
  // The transport table (van/registry.h): compiled transports, highest priority first.
  m.def(
      "alloc_shared",
      [](int64_t nbytes) {
        if (nbytes <= 0) {
          meshpost::py_bindings::RaiseValueError("alloc_shared: nbytes=" + std::to_string(nbytes) +
                                                 "; expected a positive byte count");
        }
        auto v = [&] {
          py::gil_scoped_release release;
          return meshpost::AllocateSharedTensor(meshpost::DType::kUInt8, {nbytes});
        }();
        if (!v.ok()) meshpost::py_bindings::RaiseStatus(v.status());
        return meshpost::py_bindings::TensorFromView(*v, v->owner);
      },
      py::arg("nbytes"),
      "A uint8 tensor of nbytes in a fresh shared block (memfd, 2 MiB aligned); freeing the "
      "tensor frees the block.");
  m.def(
      "is_shared",
      [](py::handle tensor) {
        meshpost::TensorView v = meshpost::py_bindings::ViewFromTensor(tensor, "is_shared: tensor");
        meshpost::SharedRef ref;
        return v.data != nullptr &&
               meshpost::SharedMemoryRegistry::Get().Find(v.data, v.nbytes(), &ref);
      },
      py::arg("tensor"), "Whether the tensor's bytes lie in one shared block.");
  m.def("available_transports", [] { return meshpost::CompiledTransports(); });
  m.def("supported_dtypes", &meshpost::py_bindings::SupportedDTypeNames);
  meshpost::py_bindings::BindCuda(m);
  m.def("option_table", &meshpost::py_bindings::OptionTableForPython,
        "[(variable, keyword, group, default, valid, meaning)] for every launch variable.");
  m.def(
      "option_table_markdown",
      [](const std::string& group) {
        for (auto g : {meshpost::OptionGroup::kLaunch, meshpost::OptionGroup::kMeshpost,
                       meshpost::OptionGroup::kRdma, meshpost::OptionGroup::kIgnored}) {
          if (group == meshpost::OptionGroupName(g)) return meshpost::OptionTableMarkdown(g);
        }
        meshpost::py_bindings::RaiseValueError("option_table_markdown: group='" + group +
                                               "'; expected launch, meshpost, rdma or ignored");
        return std::string();
      },
      py::arg("group"));
  py::class_<Node>(m, "Node")
      .def(py::init<const std::map<std::string, std::string>&>(), py::arg("env"))
      .def("start", &Node::Start)
      .def("stop", &Node::Stop, py::arg("timeout_ms"))
      .def("close", &Node::Close, py::arg("timeout_ms"))
      .def("barrier", &Node::Barrier, py::arg("group_mask"), py::arg("timeout_ms"))
      .def("push_pull", &Node::PushPull, py::arg("push_tensors"), py::arg("push_keys"),
           py::arg("pull_tensors"), py::arg("pull_keys"), py::arg("stream") = py::none())
      .def("wait_on_stream", &Node::WaitOnStream, py::arg("handler"), py::arg("stream"))
      .def("wait", &Node::Wait, py::arg("handler"), py::arg("timeout_ms"))
      .def("done", &Node::Done, py::arg("handler"))
      .def("get_all_handlers", &Node::GetAllHandlers, py::arg("handler"))
      .def("fetch_traces", &Node::FetchTraces, py::arg("handler"))
      .def("fetch_trace", &Node::FetchTrace, py::arg("handler"))
      .def("get_batch", &Node::GetBatch, py::arg("timeout_ms"))
      .def("respond", &Node::Respond, py::arg("tensors"), py::arg("handler"),
           py::arg("stream") = py::none())
      .def("respond_vec", &Node::RespondVec, py::arg("ret_buffer"), py::arg("tensors_vec"),
           py::arg("handler_vec"), py::arg("stream") = py::none())
      .def("register_recv_buffer", &Node::RegisterRecvBuffer, py::arg("tensor"),
           py::arg("worker_ranks"), py::arg("push_keys"))
      .def("pull_slots", &Node::PullSlots, py::arg("handler"))
      .def("outputs", &Node::Outputs, py::arg("handler"))
      .def_property_readonly("role", &Node::role)
      .def_property_readonly("rank", &Node::rank)
      .def_property_readonly("port", &Node::port)
      .def_property_readonly("num_workers", &Node::num_workers)
      .def_property_readonly("num_servers", &Node::num_servers)
      .def_property_readonly("started", &Node::started)
      .def("transports", &Node::Transports);
}
