// topichub live page: one EventSource for the chosen topics, a publish form, a topic list.
// Plain browser JavaScript, no build step. Element ids are a contract with browser tests.
'use strict';

(() => {
  const MAX_ROWS = 500;
  const $ = (id) => document.getElementById(id);
  let source = null; // the current EventSource, if any
  let received = 0;

  const parseTopics = (text) => String(text).split(/[\s,]+/).filter(Boolean);

  // A bearer token, for brokers started with a JWT key. EventSource cannot send headers, so
  // subscriptions carry it as ?access_token=; fetches send `authorization: Bearer`.
  const TOKEN_KEY = 'topichub.token';
  const token = () => $('token').value.trim();
  const authHeaders = () => (token() ? { authorization: 'Bearer ' + token() } : {});

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(state) {
    const badge = $('status');
    badge.textContent = state; // exactly: connecting | live | paused | reconnecting | closed
    badge.className = 'badge ' + state;
  }

  function formatTime(iso) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso ?? '');
    const ms = String(date.getMilliseconds()).padStart(3, '0');
    return date.toLocaleTimeString([], { hour12: false }) + '.' + ms;
  }

  function base64Length(text) {
    try { return atob(text).length; } catch { return Math.floor(text.length * 3 / 4); }
  }

  function formatPayload(message) {
    if (typeof message.payload_base64 === 'string') {
      return `(binary, ${base64Length(message.payload_base64)} bytes)`;
    }
    if (message.payload === undefined) return '';
    if (typeof message.payload === 'string') return message.payload;
    return JSON.stringify(message.payload, null, 2);
  }

  // Adds a row on top of #messages and drops the oldest rows beyond MAX_ROWS.
  function addRow(row) {
    const list = $('messages');
    const empty = list.querySelector('.empty');
    if (empty) empty.remove();
    list.prepend(row);
    while (list.childElementCount > MAX_ROWS) list.lastElementChild.remove();
  }

  function addMessage(message) {
    const row = el('div', 'msg');
    row.dataset.topic = message.topic;
    row.dataset.seq = String(message.seq);
    const meta = el('div', 'meta');
    meta.append(el('span', 'topic', message.topic), el('span', 'seq', 'seq ' + message.seq));
    const time = el('time', 'time', formatTime(message.published_at));
    time.dateTime = message.published_at || '';
    time.title = (message.published_at || '') + (message.cursor ? ' · cursor ' + message.cursor : '');
    meta.append(time);
    const headers = Object.entries(message.headers || {});
    if (headers.length) {
      meta.append(el('span', 'headers', headers.map(([k, v]) => `${k}: ${v}`).join(' · ')));
    }
    const payload = el('pre', 'payload', formatPayload(message));
    if (message.payload_base64 !== undefined) payload.classList.add('binary');
    row.append(meta, payload);
    addRow(row);
    received += 1;
    $('msg-count').textContent = `${received} received`;
  }

  function addNotice(kind, text, title) {
    const row = el('div', 'notice ' + kind, text);
    if (title) row.title = title;
    addRow(row);
  }

  const seqRange = (from, to) =>
    to === undefined || to === null ? `${from} to end of epoch` : from === to ? `${from}` : `${from}-${to}`;

  function parse(event) {
    try { return JSON.parse(event.data); } catch { return null; }
  }

  // Reads an API error body ({"error": {"code", "message"}}) into a message.
  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch { /* not JSON */ }
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }

  // EventSource gives up (CLOSED) on a non-200 answer without telling why: ask once more with
  // fetch to show the server's message (e.g. an invalid pattern).
  async function explainClosed(url) {
    const abort = new AbortController();
    try {
      const response = await fetch(url, { signal: abort.signal });
      addNotice('error', response.ok ? 'Subscription closed by the browser'
        : 'Subscribe failed: ' + await errorMessage(response));
    } catch (err) {
      addNotice('error', 'Subscribe failed: ' + err.message);
    } finally {
      abort.abort();
    }
  }

  function subscribe(topics) {
    const list = (Array.isArray(topics) ? topics : [topics]).flatMap(parseTopics);
    if (source) source.close();
    source = null;
    $('sub-topics').value = list.join(', ');
    if (!list.length) {
      setStatus('closed');
      $('sub-current').textContent = 'not subscribed';
      return null;
    }
    const query = list.map((t) => 'topic=' + encodeURIComponent(t)).join('&');
    const url = '/subscribe?' + query
      + (token() ? '&access_token=' + encodeURIComponent(token()) : '');
    history.replaceState(null, '', '?' + query + location.hash); // shareable URL
    const es = new EventSource(url);
    source = es;
    setStatus('connecting');
    $('sub-current').textContent = 'subscribed to ' + list.join(', ');
    const mine = (handler) => (event) => { if (source === es) handler(event); };

    es.onopen = mine(() => setStatus('live'));
    es.addEventListener('subscribed', mine((event) => {
      setStatus('live');
      const data = parse(event);
      if (data) $('sub-current').title = `subscription ${data.subscription_id}, head ${data.head}`;
    }));
    es.addEventListener('message', mine((event) => {
      const data = parse(event);
      if (data) addMessage(data);
    }));
    es.addEventListener('gap', mine((event) => {
      const g = parse(event) || {};
      addNotice('gap', `Missed messages seq ${seqRange(g.from_seq, g.to_seq)} (${g.reason})`,
        g.epoch ? 'epoch ' + g.epoch : '');
    }));
    es.addEventListener('lag', mine((event) => {
      const l = parse(event) || {};
      addNotice('lag', `Fell behind at seq ${l.from_seq}; catching up to seq ${l.to_seq}`);
    }));
    // A topic the stream names exactly was deleted: the server's last event on this stream.
    es.addEventListener('deleted', mine((event) => {
      const d = parse(event) || {};
      addNotice('error', `Deleted: ${d.message || d.topic || event.data}`);
      es.close();
      setStatus('closed');
    }));
    // Cluster mode: the node lost (or regained) the NATS cluster; delivery pauses meanwhile and
    // continues where it paused, so the stream stays open.
    es.addEventListener('cluster', mine((event) => {
      const c = parse(event) || {};
      addNotice('cluster', `Cluster: ${c.message || event.data}`);
      setStatus(c.reachable ? 'live' : 'paused');
    }));
    // The server's last word before it closes the stream (shutdown, token expiry, slow
    // consumer). EventSource reconnects by itself after a shutdown and resumes from the last id.
    es.addEventListener('end', mine((event) => {
      const body = parse(event);
      const error = (body && body.error) || {};
      addNotice('error', `Server: ${error.message || event.data}`, error.code || '');
    }));
    // The browser's own connection error.
    es.addEventListener('error', mine(() => {
      if (es.readyState === EventSource.CLOSED) {
        setStatus('closed');
        explainClosed(url);
      } else {
        setStatus('reconnecting');
      }
    }));
    return es;
  }

  function showResult(kind, text) {
    const result = $('pub-result');
    result.textContent = text;
    result.className = 'result ' + kind;
  }

  // Publishes `payload` (text; parsed first when asJson) and resolves to the server's answer.
  async function publish(topic, payload, asJson) {
    let value = payload;
    if (asJson && typeof payload === 'string') {
      try {
        value = JSON.parse(payload);
      } catch (err) {
        showResult('error', 'Invalid JSON: ' + err.message);
        return { error: { code: 'INVALID_JSON', message: err.message } };
      }
    } else if (!asJson) {
      value = String(payload ?? '');
    }
    showResult('pending', 'publishing…');
    try {
      const response = await fetch('/publish', {
        method: 'POST',
        headers: { 'content-type': 'application/json', ...authHeaders() },
        body: JSON.stringify({ topic: String(topic).trim(), payload: value }),
      });
      if (!response.ok) {
        const message = await errorMessage(response);
        showResult('error', message);
        return { error: { status: response.status, message } };
      }
      const body = await response.json();
      showResult('ok', `published seq ${body.seq} to ${body.topic}`);
      loadTopics();
      return body;
    } catch (err) {
      showResult('error', 'Network error: ' + err.message);
      return { error: { message: err.message } };
    }
  }

  // The topic list comes in pages (sorted by name): Refresh shows the first, "More topics"
  // appends the next one (the server's `next`). The periodic refresh leaves appended pages be.
  let topicPagesShown = 0;

  function topicRow(t) {
    const tr = el('tr');
    const name = el('button', 'link', t.name);
    name.type = 'button';
    name.title = 'Subscribe to ' + t.name;
    name.addEventListener('click', () => subscribe([t.name]));
    const cell = el('td');
    cell.append(name);
    tr.append(cell, ...[t.retained_messages, t.retained_bytes, t.subscribers, t.last_seq]
      .map((v) => el('td', 'num', String(v ?? ''))));
    return tr;
  }

  function topicNote(text) {
    const tr = el('tr');
    const td = el('td', 'muted', text);
    td.colSpan = 5;
    tr.append(td);
    return tr;
  }

  async function loadTopics(after) {
    const tbody = $('topics').tBodies[0];
    try {
      const query = after ? '?after=' + encodeURIComponent(after) : '';
      const response = await fetch('/topics' + query, { headers: authHeaders() });
      if (!response.ok) throw new Error(await errorMessage(response));
      const { topics = [], next } = await response.json();
      const rows = topics.map(topicRow);
      if (after) {
        tbody.querySelector('tr.more')?.remove();
        tbody.append(...rows);
        topicPagesShown += 1;
      } else {
        tbody.replaceChildren(...rows);
        topicPagesShown = 1;
      }
      if (!after && !topics.length) tbody.replaceChildren(topicNote('No topics yet.'));
      if (next) {
        const tr = el('tr', 'more');
        const td = el('td');
        td.colSpan = 5;
        const more = el('button', 'link', 'More topics');
        more.type = 'button';
        more.addEventListener('click', () => loadTopics(next));
        td.append(more);
        tr.append(td);
        tbody.append(tr);
      }
    } catch (err) {
      const note = topicNote('Could not load topics: ' + err.message);
      if (after) tbody.append(note);
      else tbody.replaceChildren(note);
    }
  }

  // Live rates: sums of the publish and delivery counters from /metrics, sampled every 2 s.
  const rates = { last: null, points: [] };
  const RATE_POINTS = 60;

  function sumSeries(text, name) {
    let total = 0;
    for (const line of text.split('\n')) {
      if (line.startsWith(name + '{') || line.startsWith(name + ' ')) total += Number(line.split(' ').pop()) || 0;
    }
    return total;
  }

  async function sampleRates() {
    try {
      const text = await (await fetch('/metrics')).text();
      const now = { t: performance.now(), pub: sumSeries(text, 'topichub_publishes_total'),
        del: sumSeries(text, 'topichub_deliveries_total'), subs: sumSeries(text, 'topichub_subscribers') };
      if (rates.last) {
        const seconds = (now.t - rates.last.t) / 1000;
        rates.points.push({ pub: (now.pub - rates.last.pub) / seconds, del: (now.del - rates.last.del) / seconds });
        if (rates.points.length > RATE_POINTS) rates.points.shift();
        const latest = rates.points[rates.points.length - 1];
        $('rate-pub').textContent = latest.pub.toFixed(1);
        $('rate-del').textContent = latest.del.toFixed(1);
        drawRates();
      }
      $('rate-subs').textContent = String(now.subs);
      rates.last = now;
    } catch { /* the broker is away; the next sample retries */ }
  }

  function drawRates() {
    const max = Math.max(1, ...rates.points.flatMap((p) => [p.pub, p.del]));
    const line = (key) => rates.points
      .map((p, i) => `${(i / (RATE_POINTS - 1)) * 600},${78 - (p[key] / max) * 74}`).join(' ');
    $('rate-line-pub').setAttribute('points', line('pub'));
    $('rate-line-del').setAttribute('points', line('del'));
  }

  function init() {
    // ?access_token= on the page URL, else the token saved last time.
    const params = new URLSearchParams(location.search);
    $('token').value = params.get('access_token') || localStorage.getItem(TOKEN_KEY) || '';
    $('token').addEventListener('change', () => {
      localStorage.setItem(TOKEN_KEY, token());
      subscribe(parseTopics($('sub-topics').value));
      loadTopics();
    });
    $('sub-form').addEventListener('submit', (event) => {
      event.preventDefault();
      subscribe(parseTopics($('sub-topics').value));
    });
    $('pub-form').addEventListener('submit', (event) => {
      event.preventDefault();
      publish($('pub-topic').value, $('pub-payload').value, $('pub-json').checked);
    });
    $('pub-payload').addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        $('pub-form').requestSubmit();
      }
    });
    $('clear-button').addEventListener('click', () => {
      $('messages').replaceChildren(el('p', 'empty muted', 'No messages yet.'));
      received = 0;
      $('msg-count').textContent = '';
    });
    $('topics-button').addEventListener('click', () => loadTopics());
    setInterval(() => { if (!document.hidden && topicPagesShown <= 1) loadTopics(); }, 10000);
    sampleRates();
    setInterval(() => { if (!document.hidden) sampleRates(); }, 2000);

    const fromUrl = params.getAll('topic').flatMap(parseTopics);
    subscribe(fromUrl.length ? fromUrl : ['demo.>']);
    loadTopics();
  }

  window.topichub = { subscribe, publish };
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
