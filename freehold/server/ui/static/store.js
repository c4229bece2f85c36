// What the page keeps in this browser (localStorage): conversations and the settings panel.
const CONVERSATIONS = 'freehold.conversations';
const CURRENT = 'freehold.current';
const SETTINGS = 'freehold.settings';

export const DEFAULT_SETTINGS = Object.freeze({
  system: '', temperature: '0.7', top_p: '', top_k: '', min_p: '', max_tokens: '512', seed: '',
  repetition_penalty: '', presence_penalty: '', frequency_penalty: '', schema: '',
});

function read(key, fallback) {
  try {
    const text = localStorage.getItem(key);
    return text === null ? fallback : JSON.parse(text);
  } catch {
    return fallback;
  }
}

export function loadSettings() {
  return { ...DEFAULT_SETTINGS, ...read(SETTINGS, {}) };
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS, JSON.stringify(settings));
}

export function loadConversations() {
  const list = read(CONVERSATIONS, []);
  return Array.isArray(list) ? list : [];
}

export function currentId() {
  return localStorage.getItem(CURRENT);
}

/** Save every conversation; when the browser's quota is full, drop the per-token logprobs of all but the current
 * conversation (the largest part) and try again. */
export function saveConversations(list, current) {
  localStorage.setItem(CURRENT, current);
  try {
    localStorage.setItem(CONVERSATIONS, JSON.stringify(list));
  } catch {
    const lighter = list.map((c) => (c.id === current ? c
      : { ...c, messages: c.messages.map(({ tokens, ...m }) => m) }));
    try {
      localStorage.setItem(CONVERSATIONS, JSON.stringify(lighter));
    } catch {
      // still too large: the conversations stay in this tab only
    }
  }
}

export function newConversation() {
  const id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
  return { id, title: 'New chat', created: Date.now(), messages: [] };
}
