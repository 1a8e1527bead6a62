// Screenshot of a meshpost Perfetto/Chrome trace-event file (python -m meshpost.trace
// report DIR --perfetto FILE) as Chromium's own trace viewer draws it: the DevTools
// Performance panel (devtools://devtools/bundled/trace_app.html), headless. For machines
// that cannot reach ui.perfetto.dev. Needs Debian's chromium and puppeteer-core from npm
// (it drives the installed browser and downloads none):
//   apt-get install chromium && npm install puppeteer-core
//   node scripts/trace_screenshot.js trace.json out.png [width height [zoom_x zoom_steps]]
// zoom_x / zoom_steps: zoom in on the time under viewport column zoom_x (the chart starts
// at x = 242) by that many mouse-wheel steps (each about 1.5x).
// It uses DevTools internals (module paths, panel and chart methods) of Chromium 156; other
// versions may need changes.
const fs = require('fs');
const puppeteer = require('puppeteer-core');

async function main() {
  const [file, out, w = '1600', h = '900', zoomX = '0', zoomSteps = '0'] = process.argv.slice(2);
  if (!file || !out) throw new Error('usage: node trace_screenshot.js TRACE.json OUT.png [W H]');
  const text = fs.readFileSync(file, 'utf8');
  JSON.parse(text);  // a clear error here beats a blank viewer
  const profile = fs.mkdtempSync('/tmp/meshpost-trace-shot-');
  // Chromium 156 opens its internal pages only with this preference set.
  fs.writeFileSync(`${profile}/Local State`, JSON.stringify({internal_only_uis_enabled: true}));
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || '/usr/lib/chromium/chromium',
    headless: 'new', userDataDir: profile,
    args: ['--no-sandbox', '--disable-gpu', '--enable-unsafe-swiftshader']});
  try {
    const page = await browser.newPage();
    await page.setViewport({width: Number(w), height: Number(h)});
    await page.goto('devtools://devtools/bundled/trace_app.html', {waitUntil: 'load'});
    await new Promise(r => setTimeout(r, 2000));
    await page.evaluate(async (body) => {
      const ui = await import('./ui/legacy/legacy.js');
      await ui.ViewManager.ViewManager.instance().showView('timeline');
      await new Promise(r => setTimeout(r, 1000));
      const tl = await import('./panels/timeline/timeline.js');
      const panel = tl.TimelinePanel.TimelinePanel.instance();
      await panel.loadFromFile(new File([body], 'meshpost.json', {type: 'application/json'}));
    }, text);
    await new Promise(r => setTimeout(r, 6000));
    await page.keyboard.press('Escape');  // the "connection closed" notice: no page to debug
    // Expand every process and thread track (the viewer opens them collapsed).
    await page.evaluate(async () => {
      const tl = await import('./panels/timeline/timeline.js');
      const chart = tl.TimelinePanel.TimelinePanel.instance().flameChart.mainFlameChart;
      for (const g of chart.timelineData().groups) g.expanded = true;
      chart.updateLevelPositions();
      chart.updateHeight();
      chart.scheduleUpdate();
    });
    await new Promise(r => setTimeout(r, 1000));
    // A click below the tracks closes the keyboard-shortcuts popover the viewer may show.
    await page.mouse.click(Number(w) / 2, Number(h) - 215);
    await new Promise(r => setTimeout(r, 800));
    for (let i = 0; i < Number(zoomSteps); ++i) {
      await page.mouse.move(Number(zoomX), 300);
      await page.mouse.wheel({deltaY: -400});
      await new Promise(r => setTimeout(r, 300));
    }
    await new Promise(r => setTimeout(r, 500));
    // The tracks only: without the annotations sidebar (242 px) and the details pane.
    const clip = {x: 242, y: 0, width: Number(w) - 242, height: Number(h) - 200};
    fs.writeFileSync(out, await page.screenshot({clip, captureBeyondViewport: false}));
  } finally {
    await browser.close();
    fs.rmSync(profile, {recursive: true, force: true});
  }
}

main().catch(e => { console.error(`trace_screenshot: ${e.message || e}`); process.exit(1); });
