// The chat page: conversations (kept in this browser, and on the server: sync.js), streaming replies rendered as sanitized Markdown, the
// settings panel, per-message numbers (TTFT, tokens/s, prompt / cached / completion tokens), token alternatives.
import { ApiError, apiKey, getJson, saveApiKey, streamChat, useApiKey } from './api.js';
import { Gauge } from './gauge.js';
import { renderMarkdown } from './markdown.js';
import { SettingsError, chatRequest } from './request.js';
import { mirror } from './sync.js';
import {
  DEFAULT_SETTINGS, currentId, loadConversations, loadSettings, newConversation, saveConversations, saveSettings,
} from './store.js';
import { renderTokens, showAlternatives, tokenOf } from './tokens.js';

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $('messages'), prompt: $('prompt'), composer: $('composer'), send: $('send'), stop: $('stop'),
  conversations: $('conversations'), modelName: $('model-name'), settings: $('settings'),
  settingsForm: $('settings-form'), settingsError: $('settings-error'), settingsToggle: $('settings-toggle'),
  keyDialog: $('key-dialog'), keyForm: $('key-form'), keyInput: $('api-key'), keyError: $('key-error'),
  remember: $('remember-key'), alternatives: $('alternatives'),
};

const state = {
  conversations: loadConversations(),
  current: null,
  settings: loadSettings(),
  controller: null, // the AbortController of the reply being streamed
};
const gauge = new Gauge(getJson);

// ---- conversations --------------------------------------------------------------------------------------------
function conversation() {
  return state.conversations.find((c) => c.id === state.current);
}

function save() {
  saveConversations(state.conversations, state.current);
}

function openConversation(id) {
  if (state.controller) return;
  state.current = id;
  save();
  renderSidebar();
  renderConversation();
}

function startNewChat() {
  if (state.controller) return;
  const empty = conversation();
  if (!empty || empty.messages.length) {
    const created = newConversation();
    state.conversations.unshift(created);
    state.current = created.id;
  }
  save();
  renderSidebar();
  renderConversation();
  ui.prompt.focus();
}

function deleteConversation(id) {
  if (state.controller) return;
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (!state.conversations.length) state.conversations.push(newConversation());
  if (!conversation()) state.current = state.conversations[0].id;
  save();
  renderSidebar();
  renderConversation();
}

function renderSidebar() {
  ui.conversations.replaceChildren(...state.conversations.map((c) => {
    const li = document.createElement('li');
    const open = document.createElement('button');
    open.type = 'button';
    open.className = 'open';
    open.textContent = c.title;
    if (c.id === state.current) open.setAttribute('aria-current', 'true');
    if (c.server) open.dataset.serverId = c.server.id; // kept on the server too (sync.js)
    open.addEventListener('click', () => openConversation(c.id));
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.className = 'delete';
    remove.textContent = '×';
    remove.setAttribute('aria-label', `Delete conversation "${c.title}"`);
    remove.addEventListener('click', () => deleteConversation(c.id));
    li.append(open, remove);
    return li;
  }));
}

// ---- messages -------------------------------------------------------------------------------------------------
function renderConversation() {
  const messages = conversation().messages;
  ui.messages.replaceChildren(...messages.map((m, i) => messageElement(m, i)));
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function messageElement(message, index) {
  const article = document.createElement('article');
  article.className = `message ${message.role}`;
  article.dataset.index = String(index);
  const role = document.createElement('h3');
  role.className = 'role';
  role.textContent = message.role === 'user' ? 'You' : 'Assistant';
  const body = document.createElement('div');
  body.className = 'body';
  const meta = document.createElement('p');
  meta.className = 'meta';
  const actions = document.createElement('div');
  actions.className = 'actions';
  article.append(role, body, meta, actions);
  fillMessage(article, message);
  return article;
}

function fillMessage(article, message) {
  const body = article.querySelector('.body');
  if (article.dataset.view === 'tokens' && message.tokens?.length) renderTokens(body, message.tokens);
  else {
    body.classList.remove('tokens');
    body.replaceChildren(renderMarkdown(message.content));
  }
  if (message.error) {
    const error = document.createElement('p');
    error.className = 'error';
    error.setAttribute('role', 'alert');
    error.textContent = message.error;
    body.append(error);
  }
  article.querySelector('.meta').textContent = describeStats(message);
  fillActions(article, message);
}

function fillActions(article, message) {
  const index = Number(article.dataset.index);
  const buttons = [];
  const last = index === conversation().messages.length - 1;
  if (message.role === 'user') buttons.push(actionButton('Edit', () => editMessage(article, index)));
  if (message.role === 'assistant' && message.tokens?.length) {
    const tokens = article.dataset.view === 'tokens';
    buttons.push(actionButton(tokens ? 'Markdown' : 'Tokens', () => {
      article.dataset.view = tokens ? 'markdown' : 'tokens';
      fillMessage(article, message);
    }, tokens ? 'Show the reply as Markdown' : 'Show the reply token by token, with alternatives'));
  }
  if (message.role === 'assistant' && last) buttons.push(actionButton('Regenerate', regenerate));
  for (const button of buttons) button.disabled = state.controller !== null;
  article.querySelector('.actions').replaceChildren(...buttons);
}

function actionButton(label, onClick, description) {
  const button = document.createElement('button');
  button.type = 'button';
  button.textContent = label;
  if (description) button.title = description;
  button.addEventListener('click', onClick);
  return button;
}

function describeStats(message) {
  const s = message.stats;
  if (message.role !== 'assistant' || !s) return '';
  const parts = [];
  if (s.ttftMs !== null) parts.push(`TTFT ${Math.round(s.ttftMs)} ms`);
  if (s.tokensPerSecond !== null) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
  if (s.promptTokens !== null) parts.push(`prompt ${s.promptTokens} (cached ${s.cachedTokens})`);
  parts.push(`completion ${s.completionTokens}`);
  if (message.stopped) parts.push('stopped');
  else if (message.finish) parts.push(`finish: ${message.finish}`);
  return parts.join(' · ');
}

function refreshActions() {
  for (const article of ui.messages.querySelectorAll('article')) {
    fillActions(article, conversation().messages[Number(article.dataset.index)]);
  }
}

// ---- generation -----------------------------------------------------------------------------------------------
/** The request for `messages` under the current settings; null (the settings panel shows why) when they are not
 * valid. Checked before the conversation changes, so invalid settings leave it, and the typed text, as they were. */
function requestBody(messages) {
  try {
    return chatRequest(state.settings, messages);
  } catch (error) {
    if (!(error instanceof SettingsError)) throw error;
    showSettingsError(error);
    return null;
  }
}

/** Send `text` as a new message, or with `from` (the index of an edited message) in place of that message and all
 * after it. */
async function send(text, from = null) {
  if (state.controller || !text.trim()) return;
  const chat = conversation();
  const message = { role: 'user', content: text };
  const history = [...chat.messages.slice(0, from ?? chat.messages.length), message];
  const body = requestBody(history);
  if (!body) return;
  chat.messages = history;
  if (chat.title === 'New chat') chat.title = text.trim().slice(0, 40);
  renderSidebar();
  if (from === null) {
    ui.prompt.value = '';
    ui.messages.append(messageElement(message, history.length - 1));
  } else renderConversation();
  await generate(body);
}

async function generate(body) {
  const chat = conversation();
  const reply = { role: 'assistant', content: '', tokens: [], stats: null };
  chat.messages.push(reply);
  const article = messageElement(reply, chat.messages.length - 1);
  ui.messages.append(article);
  const controller = new AbortController();
  setStreaming(controller);
  const started = performance.now();
  let first = null;
  let usage = null;
  try {
    for await (const chunk of streamChat(body, controller.signal)) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices ?? []) {
        if (choice.delta?.content) {
          first ??= performance.now();
          reply.content += choice.delta.content;
        }
        for (const entry of choice.logprobs?.content ?? []) reply.tokens.push(tokenOf(entry));
        if (choice.finish_reason) reply.finish = choice.finish_reason;
      }
      scheduleRender(article, reply);
    }
  } catch (error) {
    if (error.name === 'AbortError') reply.stopped = true;
    else {
      reply.error = error.message;
      if (error instanceof ApiError && error.status === 401) askForKey('The server refused the API key.');
    }
  }
  reply.stats = stats(started, first, performance.now(), usage, reply.tokens.length);
  setStreaming(null);
  fillMessage(article, reply);
  save();
  if (!reply.error) {
    document.body.classList.add('syncing');
    await mirror(chat);
    save();
    renderSidebar();
    document.body.classList.remove('syncing');
  }
}

function stats(started, first, ended, usage, numTokens) {
  const completion = usage?.completion_tokens ?? numTokens;
  const decodeSeconds = first === null ? 0 : (ended - first) / 1000;
  return {
    ttftMs: first === null ? null : first - started,
    tokensPerSecond: completion > 1 && decodeSeconds > 0 ? (completion - 1) / decodeSeconds : null,
    promptTokens: usage?.prompt_tokens ?? null,
    cachedTokens: usage?.prompt_tokens_details?.cached_tokens ?? 0,
    completionTokens: completion,
  };
}

const pendingRenders = new Map();

function scheduleRender(article, message) { // at most one Markdown render per frame per message
  if (pendingRenders.has(article)) return;
  pendingRenders.set(article, requestAnimationFrame(() => {
    pendingRenders.delete(article);
    fillMessage(article, message);
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }));
}

function setStreaming(controller) {
  state.controller = controller;
  ui.stop.hidden = controller === null;
  ui.send.disabled = controller !== null;
  document.body.classList.toggle('streaming', controller !== null);
  refreshActions();
}

function stop() {
  state.controller?.abort();
}

async function regenerate() {
  const chat = conversation();
  if (state.controller || chat.messages.at(-1)?.role !== 'assistant') return;
  const body = requestBody(chat.messages.slice(0, -1));
  if (!body) return;
  chat.messages.pop();
  ui.messages.lastElementChild.remove();
  await generate(body);
}

function editMessage(article, index) {
  if (state.controller) return;
  const message = conversation().messages[index];
  const body = article.querySelector('.body');
  const id = `edit-${index}`;
  const label = document.createElement('label');
  label.htmlFor = id;
  label.className = 'visually-hidden';
  label.textContent = 'Edit message';
  const editor = document.createElement('textarea');
  editor.id = id;
  editor.value = message.content;
  editor.rows = Math.min(12, message.content.split('\n').length + 1);
  const resend = actionButton('Save & send', () => send(editor.value, index));
  const cancel = actionButton('Cancel', () => fillMessage(article, message));
  body.replaceChildren(label, editor);
  article.querySelector('.actions').replaceChildren(resend, cancel);
  editor.focus();
}

// ---- settings -------------------------------------------------------------------------------------------------
function fillSettingsForm() {
  for (const [name, value] of Object.entries(state.settings)) {
    const field = ui.settingsForm.elements.namedItem(name);
    if (field) field.value = value;
  }
}

function showSettingsError(error) {
  ui.settings.hidden = false;
  ui.settingsToggle.setAttribute('aria-expanded', 'true');
  ui.settingsError.textContent = error.message;
  const field = ui.settingsForm.elements.namedItem(error.field);
  field?.setAttribute('aria-invalid', 'true');
  field?.focus();
}

ui.settingsForm.addEventListener('input', (event) => {
  const { name, value } = event.target;
  if (!(name in DEFAULT_SETTINGS)) return;
  state.settings[name] = value;
  event.target.removeAttribute('aria-invalid');
  ui.settingsError.textContent = '';
  saveSettings(state.settings);
});
ui.settingsForm.addEventListener('submit', (event) => event.preventDefault());
$('settings-reset').addEventListener('click', () => {
  state.settings = { ...DEFAULT_SETTINGS };
  saveSettings(state.settings);
  fillSettingsForm();
});
ui.settingsToggle.addEventListener('click', () => {
  ui.settings.hidden = !ui.settings.hidden;
  ui.settingsToggle.setAttribute('aria-expanded', String(!ui.settings.hidden));
});

// ---- API key --------------------------------------------------------------------------------------------------
function askForKey(message = '') {
  gauge.stop();
  ui.keyError.textContent = message;
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
}

async function connect() {
  try {
    const models = await getJson('/v1/models');
    ui.modelName.textContent = models.data[0]?.id ?? '';
    gauge.start();
    return true;
  } catch (error) {
    if (error.status === 401) askForKey(apiKey() ? 'The server refused the API key.' : '');
    else ui.modelName.textContent = `(server unreachable: ${error.message})`;
    return false;
  }
}

ui.keyForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  useApiKey(ui.keyInput.value.trim()); // stored only once the server accepts it
  if (await connect()) {
    saveApiKey(ui.remember.checked);
    ui.keyInput.value = '';
    ui.keyDialog.close();
    ui.prompt.focus();
  }
});

// ---- keyboard and composer ------------------------------------------------------------------------------------
ui.composer.addEventListener('submit', (event) => {
  event.preventDefault();
  send(ui.prompt.value);
});
ui.prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send(ui.prompt.value);
  }
});
ui.stop.addEventListener('click', stop);
$('new-chat').addEventListener('click', startNewChat);
document.addEventListener('keydown', (event) => {
  if (event.key !== 'Escape' || ui.keyDialog.open) return;
  if (!ui.alternatives.hidden) ui.alternatives.hidden = true;
  else stop();
});

// ---- token alternatives ---------------------------------------------------------------------------------------
ui.messages.addEventListener('click', (event) => {
  const button = event.target.closest('button.token');
  if (!button) return;
  const index = Number(button.closest('article').dataset.index);
  const token = conversation().messages[index].tokens[Number(button.dataset.index)];
  showAlternatives(ui.alternatives, token, button);
});
$('alternatives-close').addEventListener('click', () => { ui.alternatives.hidden = true; });

// ---- start ----------------------------------------------------------------------------------------------------
state.current = currentId();
if (!conversation()) {
  state.conversations.unshift(newConversation());
  state.current = state.conversations[0].id;
}
fillSettingsForm();
renderSidebar();
renderConversation();
connect();
