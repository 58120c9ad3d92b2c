// Draws a Length on one image in OHIF 3.13 (headless Chromium), labels it, and saves the measurements
// as OHIF does (the CORNERSTONE_STRUCTURED_REPORT storeMeasurements command: dcmjs SR, STOW to the PACS).
// Usage: node ohif_save_marker.js JOB.json
//   JOB: {base_url, study_uid, sop_instance_uid, label, chromium, out, hydrate_series_uid (optional: an SR
//   series loaded into the measurement panel first, whose measurements OHIF then saves again)}
// NODE_PATH must reach playwright-core (ohif-check's cache). Writes {ok, report|error, ...} to JOB.out.
'use strict';
const fs = require('fs');
const { chromium } = require('playwright-core');

const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const sleep = ms => new Promise(r => setTimeout(r, ms));
const log = (...a) => console.log(new Date().toISOString().slice(11, 23), ...a);

(async () => {
  const browser = await chromium.launch({
    executablePath: job.chromium, headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  const result = { ok: false };
  try {
    const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
    await context.addInitScript(() => localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])));
    const page = await context.newPage();
    page.on('pageerror', e => log('pageerror', e.message));
    await page.goto(`${job.base_url}/viewer?StudyInstanceUIDs=${encodeURIComponent(job.study_uid)}`, { timeout: 90000 });
    await page.waitForFunction(() => window.cornerstone && document.querySelector('canvas.cornerstone-canvas') &&
      window.cornerstone.getRenderingEngines().length &&
      window.cornerstone.getRenderingEngines()[0].getViewports().some(v => v.getImageIds && v.getImageIds().length),
    null, { timeout: 90000, polling: 250 });
    await sleep(2000);
    if (job.hydrate_series_uid) {
      // first loads an SR into the measurement panel (as a reader opening prognode's result does)
      const dsUid = await page.waitForFunction(uid => {
        const d = window.services.displaySetService.getActiveDisplaySets().find(x => x.SeriesInstanceUID === uid);
        return d && d.displaySetInstanceUID;
      }, job.hydrate_series_uid, { timeout: 60000, polling: 250 }).then(h => h.jsonValue());
      await page.locator(`[id="thumbnail-${dsUid}"]`).dblclick();
      const hydrate = page.locator('[data-cy="yes-hydrate-btn"]');
      await hydrate.waitFor({ state: 'visible', timeout: 30000 });
      await hydrate.click();
      await page.waitForFunction(() => window.services.measurementService.getMeasurements().length > 0, null,
        { timeout: 30000, polling: 250 });
      await sleep(1500);
      log('hydrated', await page.evaluate(() => window.services.measurementService.getMeasurements()
        .map(m => m.label).join('|')));
    }
    // the reader scrolls to the chosen image
    const index = await page.evaluate(async sop => {
      const vp = window.cornerstone.getRenderingEngines()[0].getViewports().find(v => v.getImageIds && v.getImageIds().length);
      const i = vp.getImageIds().findIndex(id => id.includes(sop));
      await vp.setImageIdIndex(i);
      vp.render();
      return i;
    }, job.sop_instance_uid);
    log('image index', index);
    if (index < 0) throw new Error('image not in the viewport stack');
    await sleep(1500);
    // picks the Length tool and draws a line across the image
    await page.evaluate(() => window.commandsManager.runCommand('setToolActive', { toolName: 'Length' }));
    const box = await page.locator('.viewport-element').first().boundingBox();
    const y = box.y + box.height / 2;
    await page.mouse.move(box.x + box.width * 0.35, y);
    await page.mouse.down();
    for (let i = 1; i <= 10; i++) {
      await page.mouse.move(box.x + box.width * (0.35 + 0.03 * i), y);
      await sleep(30);
    }
    await page.mouse.up();
    await sleep(1000);
    // "Track measurements for this series?" -> Yes
    const yes = page.locator('[data-cy="prompt-begin-tracking-yes-btn"]');
    if (await yes.count()) {
      await yes.first().click();
      await sleep(1000);
    }
    const count = await page.evaluate(() => window.services.measurementService.getMeasurements().length);
    log('measurements', count);
    if (!count) throw new Error('no measurement after drawing');
    // labels it (what the panel's rename dialog does) and saves as OHIF's "Save" does
    const report = await page.evaluate(async ({ label }) => {
      const ms = window.services.measurementService;
      const all = ms.getMeasurements();
      const m = all[all.length - 1];  // the one just drawn
      ms.update(m.uid, { ...m, label }, true);
      const dataSource = window.extensionManager.activeDataSourceName || 'orthanc';  // a data source *name*
      const r = await window.commandsManager.runCommand('storeMeasurements', {
        measurementData: ms.getMeasurements(), dataSource, additionalFindingTypes: ['ArrowAnnotate'],
        options: { SeriesDescription: 'Research Derived Series', SeriesNumber: 1001 },
      }, 'CORNERSTONE_STRUCTURED_REPORT');
      return { SOPInstanceUID: r.SOPInstanceUID, SOPClassUID: r.SOPClassUID,
        labels: ms.getMeasurements().map(x => x.label) };
    }, { label: job.label });
    log('stored', JSON.stringify(report));
    result.ok = true;
    result.report = report;
  } catch (e) {
    result.error = String(e.message || e).split('\n')[0];
    log('failed:', result.error);
  } finally {
    fs.writeFileSync(job.out, JSON.stringify(result));
    await browser.close();
  }
})().catch(e => {
  console.error('ohif_save_marker.js failed:', e);
  process.exit(3);
});
