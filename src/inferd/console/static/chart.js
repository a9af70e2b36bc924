// A small line chart on a <canvas>: a rolling window of points, several series, y axis with
// "nice" ticks, a legend, sharp on high-DPI screens. Enough for the live view; no library.

const NICE = [1, 2, 2.5, 5, 10];
const TICKS = 4;

/** The smallest "nice" step (1, 2, 2.5 or 5 times a power of ten) with TICKS steps >= value. */
function niceTop(value) {
  if (!(value > 0)) return 1;
  const step = value / TICKS;
  const exp = Math.pow(10, Math.floor(Math.log10(step)));
  for (const nice of NICE) {
    if (nice * exp >= step) return nice * exp * TICKS;
  }
  return 10 * exp * TICKS;
}

function formatTick(value) {
  if (value === 0) return "0";
  if (value >= 1000) return (value / 1000).toFixed(value >= 10000 ? 0 : 1) + "k";
  if (value >= 10) return value.toFixed(0);
  if (value >= 1) return value.toFixed(1).replace(/\.0$/, "");
  return value.toFixed(2).replace(/0$/, "");
}

export class LineChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{series: {name: string, color: string}[], capacity?: number, seconds?: number}} options
   */
  constructor(canvas, options) {
    this.canvas = canvas;
    this.series = options.series;
    this.capacity = options.capacity ?? 120;
    this.points = []; // {t: seconds, values: (number|null)[]}
  }

  push(t, values) {
    this.points.push({ t, values });
    if (this.points.length > this.capacity) this.points.shift();
  }

  clear() {
    this.points = [];
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return; // not visible: drawn again when it is
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const pad = { left: 44, right: 10, top: 22, bottom: 20 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    let top = 0;
    for (const p of this.points) {
      for (const v of p.values) if (v != null && v > top) top = v;
    }
    top = niceTop(top * 1.05);

    // Grid and y ticks.
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    ctx.lineWidth = 1;
    for (let i = 0; i <= TICKS; i++) {
      const value = (top * i) / TICKS;
      const y = Math.round(pad.top + plotH - (plotH * i) / TICKS) + 0.5;
      ctx.strokeStyle = i === 0 ? "#c9ced6" : "#edf0f4";
      ctx.beginPath();
      ctx.moveTo(pad.left, y);
      ctx.lineTo(pad.left + plotW, y);
      ctx.stroke();
      ctx.fillStyle = "#8a93a3";
      ctx.fillText(formatTick(value), pad.left - 6, y);
    }

    // Legend.
    ctx.textAlign = "left";
    let x = pad.left;
    for (const s of this.series) {
      ctx.fillStyle = s.color;
      ctx.fillRect(x, 6, 10, 3);
      ctx.fillStyle = "#4b5565";
      ctx.fillText(s.name, x + 14, 8);
      x += 24 + ctx.measureText(s.name).width;
    }

    const n = this.points.length;
    if (n === 0) {
      ctx.fillStyle = "#8a93a3";
      ctx.textAlign = "center";
      ctx.fillText("waiting for data…", pad.left + plotW / 2, pad.top + plotH / 2);
      return;
    }
    // x: the newest point at the right edge, one slot per point of capacity.
    const slot = plotW / Math.max(1, this.capacity - 1);
    const xAt = (i) => pad.left + plotW - (n - 1 - i) * slot;
    const yAt = (v) => pad.top + plotH - (plotH * v) / top;

    // x label: how far back the window goes.
    const span = this.points[n - 1].t - this.points[0].t;
    ctx.fillStyle = "#8a93a3";
    ctx.textAlign = "left";
    if (span > 0 && xAt(0) < pad.left + plotW - 60) {
      ctx.fillText(`−${Math.round(span)} s`, xAt(0), height - 8);
    }
    ctx.textAlign = "right";
    ctx.fillText("now", pad.left + plotW, height - 8);

    ctx.lineJoin = "round";
    ctx.lineWidth = 1.75;
    this.series.forEach((s, k) => {
      ctx.strokeStyle = s.color;
      ctx.beginPath();
      let drawing = false;
      for (let i = 0; i < n; i++) {
        const v = this.points[i].values[k];
        if (v == null) {
          drawing = false;
          continue;
        }
        if (drawing) ctx.lineTo(xAt(i), yAt(v));
        else ctx.moveTo(xAt(i), yAt(v));
        drawing = true;
      }
      ctx.stroke();
    });
  }
}
