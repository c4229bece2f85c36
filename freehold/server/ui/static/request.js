// The settings panel and the conversation -> the body of a streamed /v1/chat/completions request.
export const TOP_LOGPROBS = 5;

const NUMBERS = {
  temperature: Number, top_p: Number, top_k: Number, min_p: Number, max_tokens: Number, seed: Number,
  repetition_penalty: Number, presence_penalty: Number, frequency_penalty: Number,
};
const INTEGERS = new Set(['top_k', 'max_tokens', 'seed']);

export class SettingsError extends Error {
  constructor(field, message) {
    super(message);
    this.name = 'SettingsError';
    this.field = field;
  }
}

/** Empty settings are left out (the server's defaults apply); logprobs ask for the raw and the processed top
 * alternatives (Freehold's `processed_logprobs`), usage for prompt / cached / completion tokens. */
export function chatRequest(settings, history) {
  const messages = [];
  if (settings.system.trim()) messages.push({ role: 'system', content: settings.system });
  for (const m of history) messages.push({ role: m.role, content: m.content });
  const body = {
    messages, stream: true, stream_options: { include_usage: true },
    logprobs: true, top_logprobs: TOP_LOGPROBS, processed_logprobs: true,
  };
  for (const [name, parse] of Object.entries(NUMBERS)) {
    const text = String(settings[name] ?? '').trim();
    if (!text) continue;
    const value = parse(text);
    if (!Number.isFinite(value) || (INTEGERS.has(name) && !Number.isInteger(value))) {
      const kind = INTEGERS.has(name) ? 'an integer' : 'a number';
      throw new SettingsError(name, `${name.replaceAll('_', ' ')} must be ${kind}, got "${text}"`);
    }
    body[name] = value;
  }
  const schema = settings.schema.trim();
  if (schema) {
    let parsed;
    try {
      parsed = JSON.parse(schema);
    } catch (error) {
      throw new SettingsError('schema', `the JSON Schema is not valid JSON: ${error.message}`);
    }
    body.response_format = { type: 'json_schema', json_schema: { name: 'schema', schema: parsed, strict: true } };
  }
  return body;
}
