// The README's TensorBoard screenshots, taken in a real browser, and the check that dashboard images
// are readable at TensorBoard's default card size (prints each image's pixels and its size on screen).
//
// Needs Node.js, `npm install playwright-core` and a Chromium (e.g. `apt install chromium`); no network:
//   mnn-callback demo --out /tmp/demo
//   tensorboard --logdir /tmp/demo/tensorboard --port 6123 --host 127.0.0.1 &
//   node benchmarks/tensorboard_screenshots.js http://127.0.0.1:6123 docs/images [/usr/bin/chromium]
const path = require('path');
const { chromium } = require('playwright-core');

async function open(browser, url, filter, height) {
  const page = await browser.newPage({ viewport: { width: 1300, height } });
  // Probes are sparse and irregular: no smoothing, and the axes show every point (both are
  // TensorBoard settings, kept in the browser's localStorage).
  await page.addInitScript(() =>
    localStorage.setItem('_tb_global_settings', JSON.stringify({ scalarSmoothing: 0, ignoreOutliers: false })));
  await page.goto(`${url}/#timeseries`, { waitUntil: 'networkidle' });
  await page.waitForTimeout(2000);
  await page.getByRole('button', { name: 'Toggle settings side pane' }).click().catch(() => {});
  await page.getByRole('combobox', { name: 'Filter tags (regex)' }).fill(filter);
  await page.keyboard.press('Escape');
  await page.getByText('Tags matching filter').click().catch(() => {});
  await page.waitForTimeout(4000);
  return page;
}

(async () => {
  const [url, out, executable = '/usr/bin/chromium'] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: executable, args: ['--no-sandbox', '--disable-gpu'] });
  const scalars = await open(browser, url, 'by layer/(mnn|mnn_vs_noise|matrix_entropy|erank)$', 960);
  await scalars.screenshot({ path: path.join(out, 'tensorboard_time_series.png') });
  const images = await open(browser, url, 'layer_profile|heatmap', 850);
  const sizes = await images.$$eval('img', (elements) => elements
    .filter((element) => element.naturalWidth > 0)
    .map((element) => {
      const box = element.getBoundingClientRect();
      const scale = Math.min(box.width / element.naturalWidth, box.height / element.naturalHeight); // object-fit: contain
      return `${element.naturalWidth} x ${element.naturalHeight} px shown at ${Math.round(element.naturalWidth * scale)} x ${Math.round(element.naturalHeight * scale)}`;
    }));
  console.log(sizes.join('\n'));
  await images.screenshot({ path: path.join(out, 'tensorboard_images.png') });
  await browser.close();
})();
