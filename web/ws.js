// topichub page, WebSocket mode: one socket to GET /ws carrying several subscriptions and
// publishes with acks (the Connect protocol in JSON text frames).
// Plain browser JavaScript, no build step. Element ids are a contract with browser tests.
'use strict';

(() => {
  const MAX_ROWS = 500;
  const $ = (id) => document.getElementById(id);
  let socket = null;
  let nextRequestId = 1;
  // request_id -> what it was, for answers: {kind: 'subscribe', topics} | {kind: 'publish', topic}
  const pending = new Map();

  const parseTopics = (text) => String(text).split(/[\s,]+/).filter(Boolean);
  // The token of the page's token field; browsers cannot set headers on a WebSocket upgrade.
  const token = () => ($('token')?.value || '').trim();

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(state) {
    const badge = $('ws-status');
    badge.textContent = state; // exactly: connecting | open | closed
    badge.className = 'badge ' + (state === 'open' ? 'live' : state);
    $('ws-connect').textContent = state === 'closed' ? 'Connect' : 'Disconnect';
    for (const id of ['ws-sub-button', 'ws-pub-button']) $(id).disabled = state !== 'open';
  }

  function addRow(row) {
    const list = $('ws-messages');
    const empty = list.querySelector('.empty');
    if (empty) empty.remove();
    list.prepend(row);
    while (list.childElementCount > MAX_ROWS) list.lastElementChild.remove();
  }

  function notice(kind, text) {
    addRow(el('p', 'notice ' + kind, text));
  }

  function payloadText(message) {
    if (typeof message.payload_base64 === 'string') return '(binary)';
    if (typeof message.payload === 'string') return message.payload;
    return JSON.stringify(message.payload);
  }

  function addMessage(subscriptionId, message) {
    const row = el('div', 'msg');
    row.dataset.topic = message.topic;
    row.dataset.seq = String(message.seq);
    row.dataset.subscription = subscriptionId;
    const meta = el('div', 'meta');
    meta.append(el('span', 'topic', message.topic), el('span', 'seq', 'seq ' + message.seq),
      el('span', 'muted', subscriptionId));
    row.append(meta, el('pre', 'payload', payloadText(message)));
    addRow(row);
  }

  function addSubscription(id, topics) {
    const item = el('li', 'sub');
    item.dataset.subscriptionId = id;
    item.append(el('code', '', topics.join(' ')), ' ');
    const button = el('button', 'secondary', 'Unsubscribe');
    button.type = 'button';
    button.addEventListener('click', () => send({ unsubscribe: { subscription_id: id } }));
    item.append(button);
    $('ws-subs').append(item);
  }

  function removeSubscription(id) {
    $('ws-subs').querySelector(`li[data-subscription-id="${CSS.escape(id)}"]`)?.remove();
  }

  function send(request, what) {
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    const requestId = nextRequestId++;
    if (what) pending.set(requestId, what);
    socket.send(JSON.stringify({ request_id: requestId, ...request }));
  }

  function onFrame(frame) {
    const asked = pending.get(frame.request_id);
    if (frame.request_id) pending.delete(frame.request_id);
    if (frame.subscribed) {
      addSubscription(frame.subscribed.subscription_id, asked?.topics || []);
    } else if (frame.ack) {
      $('ws-pub-result').textContent = `ack seq ${frame.ack.seq} (${asked?.topic ?? ''})`;
      $('ws-pub-result').className = 'result ok';
    } else if (frame.message) {
      addMessage(frame.subscription_id, frame.message);
    } else if (frame.gap) {
      notice('gap', `gap: seq ${frame.gap.from_seq}–${frame.gap.to_seq ?? '…'} (${frame.gap.reason})`);
    } else if (frame.lag) {
      notice('lag', `lagged from seq ${frame.lag.from_seq}; catching up`);
    } else if (frame.deleted) {
      notice('error', `deleted: ${frame.deleted.message}`);
    } else if (frame.cluster) {
      notice('cluster', `cluster: ${frame.cluster.message}`);
    } else if (frame.unsubscribed) {
      removeSubscription(frame.subscription_id);
    } else if (frame.error) {
      const text = `${frame.error.code}: ${frame.error.message}`;
      if (asked?.kind === 'publish') {
        $('ws-pub-result').textContent = text;
        $('ws-pub-result').className = 'result error';
      } else {
        notice('error', text);
      }
    }
  }

  function connect() {
    const url = new URL('/ws', location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    if (token()) url.searchParams.set('access_token', token());
    setStatus('connecting');
    socket = new WebSocket(url);
    socket.addEventListener('open', () => setStatus('open'));
    socket.addEventListener('message', (event) => {
      try { onFrame(JSON.parse(event.data)); } catch (error) { notice('error', String(error)); }
    });
    socket.addEventListener('close', (event) => {
      socket = null;
      pending.clear();
      $('ws-subs').replaceChildren();
      setStatus('closed');
      if (event.code !== 1000 && event.code !== 1005) {
        notice('error', `closed (${event.code})${event.reason ? ': ' + event.reason : ''}`);
      }
    });
  }

  function init() {
    if (!$('ws-connect')) return;
    setStatus('closed');
    $('ws-connect').addEventListener('click', () => {
      if (socket) socket.close(1000); else connect();
    });
    $('ws-sub-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const topics = parseTopics($('ws-sub-topics').value);
      if (topics.length) send({ subscribe: { topics } }, { kind: 'subscribe', topics });
    });
    $('ws-pub-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const topic = $('ws-pub-topic').value.trim();
      $('ws-pub-result').textContent = '';
      send({ publish: { topic, payload: $('ws-pub-payload').value } }, { kind: 'publish', topic });
    });
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
