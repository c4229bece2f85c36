// Conversations kept on the server too (the Conversations API, stored under the server's --data-dir): each chat of
// this browser mirrors to one server conversation, its messages appended as replies finish; a chat whose earlier
// messages changed (edit, regenerate) starts a new server conversation. A server that stores nothing (--data-dir
// none) answers 400 once, and the page stops trying for this visit.
import { postJson } from './api.js';

const BATCH = 20; // items per request: the Conversations API's limit for a create
let off = false;

function fingerprint(messages) {
  return JSON.stringify(messages.map((m) => [m.role, m.content]));
}

/** Append `chat`'s messages the server does not have yet; sets chat.server = {id, synced, prefix}. */
export async function mirror(chat) {
  if (off) return;
  const messages = chat.messages.filter((m) => m.content);
  let server = chat.server;
  if (server && fingerprint(messages.slice(0, server.synced)) !== server.prefix) server = null;
  try {
    if (!server) {
      const created = await postJson('/v1/conversations', { metadata: { title: chat.title.slice(0, 64) } });
      server = { id: created.id, synced: 0, prefix: fingerprint([]) };
    }
    while (server.synced < messages.length) {
      const batch = messages.slice(server.synced, server.synced + BATCH);
      await postJson(`/v1/conversations/${encodeURIComponent(server.id)}/items`,
        { items: batch.map((m) => ({ type: 'message', role: m.role, content: m.content })) });
      server = { ...server, synced: server.synced + batch.length };
      server.prefix = fingerprint(messages.slice(0, server.synced));
    }
  } catch (error) {
    if (error.status === 400 || error.status === 404) off = error.status === 400;
    if (error.status === 404) server = null; // deleted on the server: the next reply starts a new one
  }
  chat.server = server;
}
