// Lessor dashboard: a single page over the server's JSON API. Every call goes through the same routes, auth and
// permission checks as any client; the API key lives only in this tab's sessionStorage and is sent as a bearer
// header (no cookies, so there is nothing for another site to forge a request with). All text from the server is
// inserted as text nodes, never as HTML.
'use strict';

const store = window.sessionStorage;
let timer = null;

// ---- helpers ------------------------------------------------------------------------------------------------
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function svg(tag, attrs) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

function status(msg, kind) {
  const s = document.getElementById('status');
  s.replaceChildren(msg ? h('p', { class: kind || 'info', id: 'status-msg' }, msg) : '');
}

async function api(path, body) {
  const headers = { 'Content-Type': 'application/json', Accept: 'application/json', 'Lessor-Extensions': '1' };
  const key = store.getItem('lessor.key');
  if (key) headers.Authorization = 'Bearer ' + key;
  const r = await fetch('/v1/' + path, { method: 'POST', headers, body: JSON.stringify(body || {}) });
  const text = await r.text();
  let json = {};
  try { json = text ? JSON.parse(text) : {}; } catch (e) { json = { message: text }; }
  if (!r.ok) {
    const err = new Error((json.message || r.statusText) + ' (' + r.status + ')');
    err.code = r.status;
    throw err;
  }
  return json;
}

function ns() { return store.getItem('lessor.namespace') || ''; }
function n(v) { return Number(v || 0); }
function fmt(v) { return n(v).toLocaleString('en'); }
// Go-style durations such as `4.69927s` shortened for a table cell.
function age(d) { const m = /^([\d.]+)s$/.exec(d || ''); return m ? Number(m[1]).toFixed(1) + 's' : (d || '-'); }
function rate(v) { return n(v).toFixed(1) + '/s'; }
// Bytes in binary units (`1.5 MiB`), counts shortened (`1.2k`, `3.4M`) where a cell is narrow.
function bytes(v) {
  let x = n(v); const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (x >= 1024 && i < u.length - 1) { x /= 1024; i += 1; }
  return (i === 0 ? String(x) : x.toFixed(x < 10 ? 1 : 0)) + ' ' + u[i];
}
function short(v) {
  const x = n(v);
  if (x < 1000) return String(x);
  for (const [d, s] of [[1e12, 'T'], [1e9, 'G'], [1e6, 'M'], [1e3, 'k']]) if (x >= d) return (x / d).toFixed(x / d < 10 ? 1 : 0) + s;
  return String(x);
}

// Storage tiers (`tiers` of queue.stats with `with_tiers`, and of queues.overview): items and payload bytes in
// memory, on disk (or in the database) and in object storage. Zero figures are omitted on the wire, and a server
// without tiers sends no `tiers` at all: that gives null, shown as "not reported" rather than as zeros.
const TIERS = [['memory', 'mem', 'Memory'], ['disk', 'disk', 'Disk / database'], ['object', 'obj', 'Object storage']];
function tierFigures(t) {
  if (!t || typeof t !== 'object') return null;
  const f = {};
  for (const [k] of TIERS) f[k] = { items: n(t[k + '_items'] ?? t[k + 'Items']), bytes: n(t[k + '_bytes'] ?? t[k + 'Bytes']) };
  return f;
}
function addTiers(a, b) {
  if (!b) return a;
  const s = a || tierFigures({});
  for (const [k] of TIERS) { s[k].items += b[k].items; s[k].bytes += b[k].bytes; }
  return s;
}
// Tiers overlap (a fjall item's record is in memory and on disk), so they are listed side by side, not stacked.
function tierTitle(f) {
  return TIERS.map(([k, , label]) => label + ': ' + fmt(f[k].items) + ' items, ' + bytes(f[k].bytes)).join('\n') +
    '\nTiers overlap: an item counts in every tier holding part of it.';
}
function tierCell(f) {
  if (!f) return h('span', { class: 'muted', title: 'This server does not report storage tiers' }, 'n/a');
  const used = TIERS.filter(([k]) => f[k].items || f[k].bytes);
  if (!used.length) return h('span', { class: 'muted', title: tierTitle(f) }, '-');
  return h('span', { class: 'tiers', title: tierTitle(f) }, used.map(([k, abbr], i) => [i ? h('span', { class: 'sep' }, ' · ') : '',
    h('span', { class: 'tier tier-' + k, 'data-tier': k, 'data-items': f[k].items, 'data-bytes': f[k].bytes },
      h('span', { class: 'dot', 'aria-hidden': 'true' }, '●'), abbr + ' ', h('span', { class: 'items' }, short(f[k].items)),
      h('span', { class: 'bytes hide-narrow' }, ' (' + bytes(f[k].bytes) + ')'))]));
}
function showError(e) {
  if (e && e.code === 401) status('Not authorised: ' + e.message + '. Set an API key.', 'error');
  else status(String(e && e.message ? e.message : e), 'error');
}

function setMain(title, ...kids) {
  const m = document.getElementById('main');
  m.replaceChildren(h('h1', {}, title), ...kids);
  document.title = title + ' · Lessor';
}

// Sums a queue.stats reply into the figures the pages show.
function totals(stats) {
  const t = { total: 0, leased: 0, scheduled: 0, ready: 0, failures: 0, oldest: '', partitions: [] };
  for (const lq of stats.logicalQueues || []) {
    for (const p of lq.partitions || []) {
      t.total += n(p.total); t.leased += n(p.total_leased); t.scheduled += n(p.scheduled);
      t.ready += n(p.total) - n(p.total_leased); t.failures += n(p.failures);
      if (p.oldest_ready_age && seconds(p.oldest_ready_age) > seconds(t.oldest)) t.oldest = p.oldest_ready_age;
      t.partitions.push(p);
    }
  }
  return t;
}

// Rates per second over the last `k` history samples.
function rates(hist, k) {
  const s = (hist.samples || []).slice(-(k || 5));
  const secs = Math.max(1, s.length * n(hist.interval_ms) / 1000);
  const sum = (f) => s.reduce((a, x) => a + n(x[f]), 0) / secs;
  return { produced: sum('produced'), leased: sum('leased'), completed: sum('completed') };
}

function every(ms, fn) {
  if (timer) clearInterval(timer);
  timer = setInterval(fn, ms);
}

// ---- overview ----------------------------------------------------------------------------------------------
const overview = { sort: 'name', dir: 1, filter: '' };

// Go durations (`1h2m3.5s`, `250ms`) in seconds, for sorting by age.
function seconds(d) {
  let t = 0;
  for (const [, v, u] of String(d || '').matchAll(/([\d.]+)(h|ms|us|µs|ns|m|s)/g)) {
    t += Number(v) * ({ h: 3600, m: 60, s: 1, ms: 1e-3, us: 1e-6, 'µs': 1e-6, ns: 1e-9 })[u];
  }
  return t;
}

async function pageOverview() {
  const filter = h('input', { type: 'search', id: 'filter', placeholder: 'Filter by name', 'aria-label': 'Filter queues by name', value: overview.filter });
  const body = h('tbody', { id: 'queue-rows' });
  const cols = [['name', 'Queue'], ['ready', 'Ready'], ['leased', 'Leased'], ['scheduled', 'Scheduled'],
    ['produced', 'Produce'], ['lease', 'Lease'], ['completed', 'Complete'], ['age', 'Oldest item'], ['dlq', 'DLQ depth'], ['stored', 'Tiers']];
  const head = h('tr', {}, cols.map(([k, label]) => h('th', {
    scope: 'col', tabindex: '0', class: k === 'name' ? '' : ['produced', 'lease', 'completed', 'scheduled'].includes(k) ? 'num hide-narrow' : 'num', 'data-key': k,
    'aria-sort': overview.sort === k ? (overview.dir > 0 ? 'ascending' : 'descending') : 'none',
    title: k === 'stored' ? 'Storage tiers: items in memory (mem), on disk or in the database (disk), in object storage (obj); hover a cell for bytes' : undefined,
    onclick: () => sortBy(k), onkeydown: (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sortBy(k); } },
  }, label)));
  let rows = [];
  function sortBy(k) {
    overview.dir = overview.sort === k ? -overview.dir : 1; overview.sort = k;
    for (const th of head.children) th.setAttribute('aria-sort', th.dataset.key === k ? (overview.dir > 0 ? 'ascending' : 'descending') : 'none');
    draw();
  }
  function draw() {
    const f = overview.filter.toLowerCase();
    const shown = rows.filter((r) => r.name.toLowerCase().includes(f));
    shown.sort((a, b) => (a[overview.sort] < b[overview.sort] ? -1 : a[overview.sort] > b[overview.sort] ? 1 : 0) * overview.dir);
    body.replaceChildren(...shown.map((r) => h('tr', { 'data-queue': r.name },
      h('td', {}, h('a', { href: '#/queue/' + encodeURIComponent(r.name) }, r.name), r.paused ? h('span', { class: 'muted' }, ' (paused)') : '',
        r.error ? h('span', { class: 'error' }, ' ' + r.error) : ''),
      h('td', { class: 'num', 'data-col': 'ready' }, r.figures ? fmt(r.ready) : '-'),
      h('td', { class: 'num', 'data-col': 'leased' }, r.figures ? fmt(r.leased) : '-'),
      h('td', { class: 'num hide-narrow', 'data-col': 'scheduled' }, r.figures ? fmt(r.scheduled) : '-'),
      h('td', { class: 'num hide-narrow' }, rate(r.produced)), h('td', { class: 'num hide-narrow' }, rate(r.lease)),
      h('td', { class: 'num hide-narrow' }, rate(r.completed)),
      h('td', { class: 'num', 'data-col': 'age', title: r.ageText ? 'Age of the oldest item waiting to be leased' : 'No item waiting' }, r.ageText ? age(r.ageText) : '-'),
      h('td', { class: 'num', 'data-col': 'dlq' }, r.dlqName ? fmt(r.dlq) : '-'),
      h('td', { class: 'num', 'data-col': 'tiers' }, r.figures ? tierCell(r.tiers) : '-'))));
    if (!shown.length) body.replaceChildren(h('tr', {}, h('td', { colspan: cols.length, class: 'muted' }, 'No queues.')));
  }
  filter.addEventListener('input', () => { overview.filter = filter.value; draw(); });
  const nsInput = h('input', { id: 'namespace', value: ns(), placeholder: '_system', 'aria-label': 'Namespace', size: 12 });
  const nsForm = h('form', { class: 'toolbar', onsubmit: (e) => { e.preventDefault(); store.setItem('lessor.namespace', nsInput.value.trim()); refresh(); } },
    h('label', {}, 'Namespace', nsInput), h('button', { type: 'submit' }, 'Show'));
  setMain('Queues',
    h('div', { class: 'toolbar' }, filter, h('a', { href: '#/create', id: 'create-link' }, 'Create queue')), nsForm,
    h('div', { class: 'scroll' }, h('table', { id: 'queues' }, h('caption', { class: 'muted' }, 'Live, refreshed every 2 s. Click a heading to sort.'), h('thead', {}, head), body)));
  // One request per refresh: queues.overview answers every figure of the page.
  async function refresh() {
    try {
      const r = await api('queues.overview', { namespace: ns(), limit: 1000 });
      rows = (r.items || []).map((q) => ({
        name: q.queue_name, paused: !!q.paused, figures: !q.stats_hidden,
        ready: n(q.ready), leased: n(q.leased), scheduled: n(q.scheduled), produced: n(q.produce_rate), lease: n(q.lease_rate),
        completed: n(q.complete_rate), age: seconds(q.oldest_ready_age), ageText: q.oldest_ready_age || '', dlqName: q.dead_queue || '',
        dlq: n(q.dead_depth), error: q.error || '', tiers: tierFigures(q.tiers),
        stored: q.tiers ? TIERS.reduce((a, [k]) => a + n(q.tiers[k + '_bytes']), 0) : -1,
      }));
      draw();
      status('');
    } catch (e) { showError(e); rows = []; draw(); }
  }
  await refresh();
  every(2000, refresh);
}

// ---- one queue ----------------------------------------------------------------------------------------------
function chart(samples, series, label) {
  const W = 600, H = 140, P = 20;
  const el = svg('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': label, preserveAspectRatio: 'none' });
  const max = Math.max(1, ...samples.flatMap((s) => series.map((k) => n(s[k]))));
  const t = svg('text', { x: 4, y: 12 }); t.textContent = 'max ' + fmt(max); el.append(t);
  for (const k of series) {
    const pts = samples.map((s, i) => `${P + (i * (W - 2 * P)) / Math.max(1, samples.length - 1)},${H - P - (n(s[k]) * (H - 2 * P)) / max}`);
    el.append(svg('polyline', { class: k === 'ready' ? 'depth' : k === 'lease_age_ms' ? 'latency' : k, points: pts.join(' ') }));
  }
  return el;
}

async function pageQueue(name) {
  const cards = h('div', { class: 'cards', id: 'queue-cards' });
  const charts = h('div', { id: 'charts' });
  const parts = h('tbody', { id: 'partitions' });
  const tiers = h('tbody', { id: 'tiers' });
  const settings = h('form', { class: 'grid', id: 'settings' });
  const actions = h('div', { class: 'toolbar', id: 'actions' });
  setMain('Queue ' + name,
    h('p', {}, h('a', { href: '#/items/' + encodeURIComponent(name), id: 'browse-link' }, 'Browse items'), ' · ', h('a', { href: '#/' }, 'All queues')),
    cards, h('h2', {}, 'Last minutes'), charts,
    h('h2', {}, 'Partitions'), h('div', { class: 'scroll' }, h('table', {}, h('thead', {}, h('tr', {},
      ['Partition', 'Total', 'Ready', 'Leased', 'Scheduled', 'Failures', 'Oldest ready', 'Avg age', 'Avg lease left'].map((c, i) => h('th', { scope: 'col', class: i ? 'num' : '' }, c)))), parts)),
    h('h2', {}, 'Storage tiers'),
    h('p', { class: 'muted' }, 'Items and payload bytes per partition in memory, on disk (or in the database) and in object storage. ' +
      'Tiers overlap: an item counts in every tier holding part of it.'),
    h('div', { class: 'scroll' }, h('table', { id: 'tier-table' }, h('thead', {}, h('tr', {},
      ['Partition', 'Memory items', 'Memory bytes', 'Disk items', 'Disk bytes', 'Object items', 'Object bytes'].map((c, i) => h('th', { scope: 'col', class: i ? 'num' : '' }, c)))), tiers)),
    h('h2', {}, 'Settings'), settings, h('h2', {}, 'Actions'), actions);
  let info;
  try { info = await api('queues.info', { queue_name: name }); } catch (e) { showError(e); return; }
  if (info.dead_queue) {
    document.getElementById('browse-link').after(' · ', h('a', { href: '#/items/' + encodeURIComponent(info.dead_queue), id: 'dead-link' }, 'Dead-lettered items (' + info.dead_queue + ')'));
  }
  const field = (key, label, type) => h('label', {}, label, h('input', { name: key, id: 'set-' + key, type: type || 'text', value: info[key] === undefined ? '' : info[key] }));
  settings.append(field('lease_timeout', 'Lease timeout'), field('expire_timeout', 'Expire timeout'), field('max_attempts', 'Max attempts', 'number'),
    field('dead_queue', 'Dead-letter queue'), field('reference', 'Reference'), field('dedup_window', 'Dedup window'),
    h('button', { type: 'submit', id: 'save-settings' }, 'Save settings'));
  settings.addEventListener('submit', async (e) => {
    e.preventDefault();
    const f = new FormData(settings);
    const upd = { ...info };
    delete upd.created_at; delete upd.updated_at; delete upd.partitions;
    for (const [k, v] of f.entries()) upd[k] = k === 'max_attempts' ? n(v) : String(v);
    if (!confirm('Update the settings of ' + name + '?')) return;
    try {
      await api('queues.update', upd);
      info = await api('queues.info', { queue_name: name });
    } catch (err) { showError(err); return; }
    // queues.update reads an empty text or a zero as "unchanged" (Querator's rule), so a field the user cleared
    // keeps its stored value: say so, and show what is stored, rather than report a change that did not happen.
    const stored = (k) => (info[k] === undefined || info[k] === null ? '' : String(info[k]));
    const kept = [];
    for (const [k, v] of f.entries()) {
      const cleared = k === 'max_attempts' ? n(v) === 0 : String(v).trim() === '';
      if (cleared && stored(k) !== '' && stored(k) !== '0') kept.push(k);
      const input = document.getElementById('set-' + k);
      if (input) input.value = stored(k);
    }
    if (kept.length) {
      status('Saved, but ' + kept.join(', ') + ' kept the stored value: an empty or zero value means "unchanged". ' +
        'To retire a dead-letter queue, delete it with force (lessor delete --force).', 'error');
    } else {
      status('Settings saved.');
    }
  });
  const act = (id, label, question, fn, danger) => h('button', { id, type: 'button', class: danger ? 'danger' : '', onclick: async () => {
    if (!confirm(question)) return;
    try { await fn(); status(label + ': done.'); } catch (err) { showError(err); }
  } }, label);
  actions.append(
    info.paused ? act('resume', 'Resume', 'Resume ' + name + '?', async () => { await api('queue.resume', { queue_name: name }); route(); })
      : act('pause', 'Pause', 'Pause ' + name + '? Leases wait until it is resumed.', async () => { await api('queue.pause', { queue_name: name }); route(); }),
    act('clear', 'Clear', 'Remove all ready and scheduled items of ' + name + '?', () => api('queue.clear', { queue_name: name, queue: true, scheduled: true }), true),
    act('redrive', 'Redrive to source', 'Move the dead-lettered items in ' + name + ' back to the queues they came from?', () => api('queue.redrive', { dead_queue: name })),
    act('delete', 'Delete queue', 'Delete ' + name + ' and all its items? This cannot be undone.', async () => { await api('queues.delete', { queue_name: name }); location.hash = '#/'; }, true));
  async function refresh() {
    try {
      const [st, hist] = await Promise.all([api('queue.stats', { queue_name: name, with_oldest_age: true, with_tiers: true }), api('queue.history', { queue_name: name })]);
      const t = totals(st); const r = rates(hist);
      const card = (k, v, id) => h('div', { class: 'card', id }, h('div', { class: 'v' }, v), h('div', { class: 'k' }, k));
      cards.replaceChildren(card('Ready', fmt(t.ready), 'card-ready'), card('Leased', fmt(t.leased), 'card-leased'), card('Scheduled', fmt(t.scheduled)), card('Oldest ready', t.oldest ? age(t.oldest) : '-', 'card-oldest'),
        card('Produce', rate(r.produced)), card('Lease', rate(r.leased)), card('Complete', rate(r.completed)), card('State', info.paused ? 'paused' : 'running'));
      const s = hist.samples || [];
      const perSec = s.map((x) => ({ ...x, produced: n(x.produced) * 1000 / n(hist.interval_ms), leased: n(x.leased) * 1000 / n(hist.interval_ms), completed: n(x.completed) * 1000 / n(hist.interval_ms) }));
      charts.replaceChildren(
        h('p', { class: 'legend' }, h('span', { class: 'produced' }, '— produce/s'), h('span', { class: 'leased' }, '— lease/s'), h('span', { class: 'completed' }, '— complete/s')),
        chart(perSec, ['produced', 'leased', 'completed'], 'Rates of ' + name + ' over the last ' + Math.round(s.length * n(hist.interval_ms) / 1000) + ' seconds'),
        h('p', { class: 'legend' }, h('span', { class: 'depth' }, '— ready items')),
        chart(s, ['ready'], 'Ready items of ' + name + ' over time'),
        h('p', { class: 'legend' }, h('span', { class: 'latency' }, '— mean wait from produce to lease (ms)')),
        chart(s, ['lease_age_ms'], 'Mean wait from produce to lease of ' + name + ' over time, in milliseconds'));
      parts.replaceChildren(...t.partitions.map((p) => h('tr', {}, h('td', {}, String(n(p.partition))), h('td', { class: 'num' }, fmt(p.total)),
        h('td', { class: 'num' }, fmt(n(p.total) - n(p.total_leased))), h('td', { class: 'num' }, fmt(p.total_leased)), h('td', { class: 'num' }, fmt(p.scheduled)),
        h('td', { class: 'num' }, fmt(p.failures)), h('td', { class: 'num' }, p.oldest_ready_age ? age(p.oldest_ready_age) : '-'), h('td', { class: 'num' }, age(p.average_age)), h('td', { class: 'num' }, age(p.average_leased_age)))));
      const withTiers = t.partitions.filter((p) => p.tiers);
      let sum = null;
      tiers.replaceChildren(...withTiers.map((p) => {
        const f = tierFigures(p.tiers); sum = addTiers(sum, f);
        return h('tr', { 'data-partition': n(p.partition) }, h('td', {}, String(n(p.partition))),
          TIERS.map(([k]) => [h('td', { class: 'num', 'data-tier': k, 'data-field': 'items' }, fmt(f[k].items)),
            h('td', { class: 'num', 'data-tier': k, 'data-field': 'bytes', title: fmt(f[k].bytes) + ' bytes' }, bytes(f[k].bytes))]));
      }));
      if (withTiers.length > 1) {
        tiers.append(h('tr', { class: 'total' }, h('th', { scope: 'row' }, 'All'),
          TIERS.map(([k]) => [h('td', { class: 'num' }, fmt(sum[k].items)), h('td', { class: 'num' }, bytes(sum[k].bytes))])));
      }
      if (!withTiers.length) tiers.replaceChildren(h('tr', {}, h('td', { colspan: 7, class: 'muted' }, 'This server does not report storage tiers.')));
    } catch (e) { showError(e); }
  }
  await refresh();
  every(2000, refresh);
}

// ---- items browser ------------------------------------------------------------------------------------------
function preview(b64, mode) {
  let bytes;
  try { bytes = Uint8Array.from(atob(b64 || ''), (c) => c.charCodeAt(0)); } catch (e) { bytes = new Uint8Array(); }
  if (mode === 'hex') {
    const lines = [];
    for (let i = 0; i < bytes.length && i < 4096; i += 16) {
      const row = Array.from(bytes.slice(i, i + 16));
      lines.push(i.toString(16).padStart(6, '0') + '  ' + row.map((x) => x.toString(16).padStart(2, '0')).join(' '));
    }
    return lines.join('\n');
  }
  const text = new TextDecoder('utf-8', { fatal: false }).decode(bytes);
  if (mode === 'json') { try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return 'not JSON: ' + text; } }
  return text;
}

async function pageItems(name, state) {
  state = state || 'ready';
  const sel = h('select', { id: 'state', 'aria-label': 'Item state' }, ['ready', 'leased', 'scheduled'].map((s) => h('option', { value: s, selected: s === state }, s)));
  const part = h('input', { id: 'partition', type: 'number', min: 0, value: 0, 'aria-label': 'Partition', size: 4 });
  const mode = h('select', { id: 'mode', 'aria-label': 'Payload preview as' }, ['text', 'json', 'hex'].map((s) => h('option', { value: s }, s)));
  const rows = h('tbody', { id: 'items' });
  const more = h('button', { type: 'button', id: 'next-page', hidden: true }, 'Next page');
  const pre = h('pre', { id: 'payload', 'aria-label': 'Payload preview' }, 'Select an item to preview its payload.');
  setMain('Items of ' + name,
    h('p', {}, h('a', { href: '#/queue/' + encodeURIComponent(name) }, 'Back to ' + name)),
    h('div', { class: 'toolbar' }, h('label', {}, 'State', sel), h('label', {}, 'Partition', part), h('label', {}, 'Preview as', mode),
      h('button', { type: 'button', id: 'reload-items', onclick: () => load('') }, 'Reload')),
    h('div', { class: 'scroll' }, h('table', {}, h('thead', {}, h('tr', {}, ['Id', 'Attempts', 'Priority', 'Holder', 'Deadline', 'Kind', 'Actions'].map((c) => h('th', { scope: 'col' }, c)))), rows)),
    more, h('h2', {}, 'Payload'), pre);
  let items = []; let current = null;
  const show = (it) => { current = it; pre.textContent = preview(it.payload, mode.value); };
  mode.addEventListener('change', () => { if (current) show(current); });
  sel.addEventListener('change', () => load(''));
  part.addEventListener('change', () => load(''));
  async function itemAction(it, verb) {
    const p = n(part.value);
    if (!confirm(verb[0].toUpperCase() + verb.slice(1) + ' item ' + it.id + '?')) return;
    try {
      if (verb === 'complete') await api('queue.complete', { queue_name: name, partition: p, ids: [it.id], request_timeout: '10s' });
      else await api('queue.retry', { queue_name: name, partition: p, items: [{ id: it.id, dead: verb === 'dead-letter' }] });
      status(verb + ': done.');
      await load('');
    } catch (e) { showError(e); }
  }
  async function load(pivot) {
    try {
      const r = await api('queue.browse', { queue_name: name, partition: n(part.value), state: sel.value, pivot, limit: 50 });
      items = pivot ? items.concat(r.items || []) : (r.items || []);
      rows.replaceChildren(...items.map((it) => h('tr', { 'data-id': it.id },
        h('td', {}, h('button', { type: 'button', class: 'link', 'aria-label': 'Preview item ' + it.id, onclick: () => show(it) }, it.id)),
        h('td', {}, String(n(it.attempts))), h('td', {}, String(n(it.priority))), h('td', {}, it.holder || '-'),
        h('td', {}, it.lease_deadline || it.enqueue_at || '-'), h('td', {}, it.kind || '-'),
        h('td', {}, it.state === 'leased' ? [
          h('button', { type: 'button', class: 'retry', 'aria-label': 'Retry item ' + it.id, onclick: () => itemAction(it, 'retry') }, 'Retry'), ' ',
          h('button', { type: 'button', class: 'complete', 'aria-label': 'Complete item ' + it.id, onclick: () => itemAction(it, 'complete') }, 'Complete'), ' ',
          h('button', { type: 'button', class: 'danger', 'aria-label': 'Dead-letter item ' + it.id, onclick: () => itemAction(it, 'dead-letter') }, 'Dead-letter'),
        ] : h('span', { class: 'muted' }, 'lease to act')))));
      if (!items.length) rows.replaceChildren(h('tr', {}, h('td', { colspan: 7, class: 'muted' }, 'No ' + sel.value + ' items in this partition.')));
      more.hidden = !r.next_pivot;
      more.onclick = () => load(r.next_pivot);
    } catch (e) { showError(e); }
  }
  await load('');
}

// ---- create, server, key ------------------------------------------------------------------------------------
function pageCreate() {
  const f = h('form', { class: 'grid', id: 'create-form' },
    h('label', {}, 'Name', h('input', { name: 'queue_name', id: 'new-name', required: true })),
    h('label', {}, 'Namespace', h('input', { name: 'namespace', id: 'new-namespace', value: ns() })),
    h('label', {}, 'Lease timeout', h('input', { name: 'lease_timeout', value: '1m' })),
    h('label', {}, 'Expire timeout', h('input', { name: 'expire_timeout', value: '24h' })),
    h('label', {}, 'Partitions', h('input', { name: 'requested_partitions', type: 'number', min: 1, value: 1 })),
    h('label', {}, 'Dead-letter queue', h('input', { name: 'dead_queue' })),
    h('button', { type: 'submit', id: 'create-submit' }, 'Create'));
  f.addEventListener('submit', async (e) => {
    e.preventDefault();
    const q = Object.fromEntries(new FormData(f).entries());
    q.requested_partitions = n(q.requested_partitions);
    for (const k of Object.keys(q)) if (q[k] === '') delete q[k];
    if (!confirm('Create queue ' + q.queue_name + '?')) return;
    try { await api('queues.create', q); status('Created ' + q.queue_name + '.'); location.hash = '#/queue/' + encodeURIComponent(q.queue_name); } catch (err) { showError(err); }
  });
  setMain('Create queue', f);
}

async function pageServer() {
  const dl = h('table', { id: 'server-info' });
  setMain('Server', dl);
  try {
    const r = await fetch('/health');
    const health = await r.json();
    const rows = [['Version', health.version], ['Health', health.status],
      ['Storage check', ((health.checks || {})['queues:storage'] || []).map((c) => c.status + (c.output ? ' (' + c.output + ')' : '')).join(', ')],
      ['API key', store.getItem('lessor.key') ? 'set for this tab' : 'none (auth off, or not signed in)'], ['Namespace shown', ns() || '_system']];
    try {
      const me = await api('auth.whoami', {});
      rows.push(['Auth', me.auth_enabled ? 'on' : 'off'], ['Signed in as', me.auth_enabled ? (me.username || 'anonymous') + (me.namespace_scope ? ' (scope ' + me.namespace_scope + ')' : '') : '-'],
        ['Permissions', (me.namespaces || []).map((x) => x.namespace + ': ' + (x.permissions || []).length).join(', ') || '-']);
    } catch (e) { rows.push(['Signed in as', e.message]); }
    try { const l = await api('queues.list', { namespace: ns(), limit: 1000 }); rows.push(['Queues visible', String((l.items || []).length)]); } catch (e) { rows.push(['Queues visible', e.message]); }
    // Where the visible queues' items are, summed from queues.overview (one page of up to 1,000 queues). The
    // object-storage counters (objects written, deleted, orphaned; latency) are in /metrics only: no JSON route
    // gives them, so the page names them rather than parsing Prometheus text.
    try {
      const o = await api('queues.overview', { namespace: ns(), limit: 1000 });
      let sum = null; let reported = false;
      for (const q of o.items || []) { if (q.tiers) { reported = true; sum = addTiers(sum, tierFigures(q.tiers)); } }
      rows.push(['Storage tiers', reported ? h('span', { id: 'server-tiers' }, TIERS.map(([k, , label], i) => [i ? ' · ' : '',
        h('span', { 'data-tier': k, 'data-items': sum[k].items, 'data-bytes': sum[k].bytes }, label + ': ' + fmt(sum[k].items) + ' items, ' + bytes(sum[k].bytes))]))
        : 'not reported by this server']);
      if (reported && (sum.object.items || sum.object.bytes)) {
        rows.push(['Object storage', 'offload counters and latency: lessor_offload_* in /metrics']);
      }
    } catch (e) { rows.push(['Storage tiers', e.message]); }
    // The configuration summary needs queue.list in _system; a namespace's key sees the rest without it.
    try {
      const i = await api('server.info', {});
      rows.push(['Queue storage', i.queue_storage || '-'],
        ['Partition storage', (i.partition_storage || []).map((p) => p.name + ' (' + p.driver + ', affinity ' + n(p.affinity) + ')').join(', ')],
        ['Auth backend', i.auth_backend || 'none'], ['TLS', i.tls ? 'on' : 'off'], ['Max produce body', fmt(i.max_produce_body) + ' bytes']);
    } catch (e) { rows.push(['Configuration', e.code === 403 ? 'not visible to this key' : e.message]); }
    dl.replaceChildren(...rows.map(([k, v]) => h('tr', {}, h('th', { scope: 'row' }, k), h('td', {}, v instanceof Node ? v : (v || '-')))));
  } catch (e) { showError(e); }
}

// Who the stored key is (auth.whoami), and the namespace to show for it: the key's scope, else the one namespace
// where its user holds queue.list when there is exactly one and no `_system` binding (an administrator sees `_system`).
async function whoami() {
  const me = await api('auth.whoami', {});
  let pick = null;
  if (me.namespace_scope) pick = me.namespace_scope;
  else {
    const nss = (me.namespaces || []).filter((x) => (x.permissions || []).includes('queue.list'));
    if (nss.length === 1 && nss[0].namespace !== '_system') pick = nss[0].namespace;
  }
  return { me, pick };
}

function pageKey() {
  const input = h('input', { id: 'api-key', type: 'password', autocomplete: 'off', 'aria-label': 'API key', size: 40 });
  const who = h('div', { id: 'whoami' });
  const f = h('form', { class: 'toolbar', id: 'key-form' }, h('label', {}, 'API key', input),
    h('button', { type: 'submit', id: 'key-submit' }, 'Use key'),
    h('button', { type: 'button', id: 'key-forget', onclick: () => { store.removeItem('lessor.key'); store.removeItem('lessor.namespace'); who.replaceChildren(); status('Key forgotten.'); } }, 'Forget key'));
  f.addEventListener('submit', async (e) => {
    e.preventDefault();
    store.setItem('lessor.key', input.value.trim());
    try {
      const { me, pick } = await whoami();
      // A namespace-scoped key works only in its namespace: show that one without asking (and `_system`, the
      // default, for a key that may see more than one namespace).
      store.setItem('lessor.namespace', pick || '');
      status('Key accepted: ' + (me.username || 'anonymous') + (pick ? ', namespace ' + pick : '') + '.');
      location.hash = '#/';
    } catch (err) { store.removeItem('lessor.key'); showError(err); }
  });
  setMain('API key', h('p', { class: 'muted' }, 'The key stays in this tab only (sessionStorage) and is sent as a bearer header. ' +
    'The namespace is chosen from the key (its scope); change it on the Queues page.'), f, who);
  if (store.getItem('lessor.key')) {
    whoami().then(({ me }) => who.replaceChildren(h('p', {}, 'Signed in as ' + (me.username || 'anonymous') +
      (me.namespace_scope ? ' (key scoped to ' + me.namespace_scope + ')' : '')))).catch(showError);
  }
}

// ---- router -------------------------------------------------------------------------------------------------
async function route() {
  if (timer) { clearInterval(timer); timer = null; }
  const parts = (location.hash || '#/').slice(2).split('/').map(decodeURIComponent);
  try {
    if (parts[0] === 'queue' && parts[1]) await pageQueue(parts[1]);
    else if (parts[0] === 'items' && parts[1]) await pageItems(parts[1], parts[2]);
    else if (parts[0] === 'server') await pageServer();
    else if (parts[0] === 'key') pageKey();
    else if (parts[0] === 'create') pageCreate();
    else await pageOverview();
  } catch (e) { showError(e); }
}

window.addEventListener('hashchange', () => { status(''); route(); });
route();
