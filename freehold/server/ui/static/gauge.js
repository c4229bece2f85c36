// The live engine gauge: KV blocks used / total, running / waiting requests and prefix-cache hits, polled from the
// server's GET /debug/engine (the same numbers /metrics exports for Prometheus).
const INTERVAL_MS = 1000;

export class Gauge {
  constructor(getJson) {
    this.getJson = getJson;
    this.timer = null;
    this.meter = document.getElementById('kv-meter');
    this.blocks = document.getElementById('kv-blocks');
    this.requests = document.getElementById('kv-requests');
    this.prefix = document.getElementById('kv-prefix');
  }

  start() {
    if (this.timer !== null) return;
    this.timer = setInterval(() => this.poll(), INTERVAL_MS);
    this.poll();
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }

  async poll() {
    if (document.hidden) return;
    try {
      this.show(await this.getJson('/debug/engine'));
    } catch (error) {
      this.blocks.textContent = error.status === 401 ? 'API key needed' : 'engine state unavailable';
      if (error.status === 401) this.stop();
    }
  }

  show(s) {
    this.meter.value = s.kv_blocks_total ? s.kv_blocks_used / s.kv_blocks_total : 0;
    this.blocks.textContent = `${s.kv_blocks_used} / ${s.kv_blocks_total} blocks in use`;
    this.requests.textContent = `${s.num_running} running · ${s.num_waiting} waiting`;
    const rate = s.prefix_cache_queries ? Math.round((100 * s.prefix_cache_hits) / s.prefix_cache_queries) : 0;
    this.prefix.textContent =
      `prefix cache: ${s.prefix_cache_hits} of ${s.prefix_cache_queries} prompt tokens (${rate}%)`;
  }
}
