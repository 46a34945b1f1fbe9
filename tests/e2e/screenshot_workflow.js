// Screenshot of an e2e workflow in ComfyUI's own editor (for the README), with headless Chromium.
//   node screenshot_workflow.js <comfyui url> <api workflow json> <out.png> [KEY=value ...]
// Needs playwright-core (npm) and Debian's chromium; ComfyUI must be running with our nodes.
const { chromium } = require("playwright-core");
const fs = require("fs");

(async () => {
  const [url, workflowPath, out, ...subs] = process.argv.slice(2);
  let text = fs.readFileSync(workflowPath, "utf8");
  const graph = JSON.parse(text);
  const values = Object.fromEntries(subs.map((s) => s.split("=")));
  for (const node of Object.values(graph))
    for (const [name, value] of Object.entries(node.inputs))
      if (typeof value === "string" && value.startsWith("$")) {
        const v = values[value.slice(1)];
        node.inputs[name] = isNaN(Number(v)) ? v : Number(v);
      }
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1700, height: 820 } });
  await page.goto(url, { waitUntil: "networkidle" });
  await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 60000 });
  await page.evaluate(async (g) => { await window.app.loadApiJson(g, "LowBit e2e"); }, graph);
  await page.waitForTimeout(1500);
  await page.keyboard.press("Escape");  // the first-run templates dialog
  await page.evaluate(() => {
    // Columns by depth (a node sits right of everything it reads), rows in order within a column.
    const graph = window.app.graph;
    const nodes = graph._nodes;
    const byId = Object.fromEntries(nodes.map((n) => [n.id, n]));
    const depth = {};
    const level = (n) => {
      if (depth[n.id] !== undefined) return depth[n.id];
      depth[n.id] = 0;
      let d = 0;
      for (const input of n.inputs || []) {
        const link = input.link != null ? graph.links[input.link] || graph.links.get?.(input.link) : null;
        if (link && byId[link.origin_id]) d = Math.max(d, level(byId[link.origin_id]) + 1);
      }
      return (depth[n.id] = d);
    };
    const rows = {};
    for (const n of nodes) {
      const d = level(n);
      const y = rows[d] || 0;
      n.pos = [40 + d * 340, 40 + y];
      rows[d] = y + n.size[1] + 80;
    }
    const canvas = window.app.canvas;
    canvas.ds.scale = 0.85;
    canvas.ds.offset = [80, 110];
    canvas.setDirty(true, true);
  });
  await page.waitForTimeout(1000);
  await page.screenshot({ path: out });
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
