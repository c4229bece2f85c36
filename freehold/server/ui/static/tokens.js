// Per-token view of a reply: each token a button; clicking one shows its top alternatives with their probabilities
// as the model gave them (raw logprobs) and as the sampling settings reshaped them (Freehold's processed logprobs).

/** One chat logprobs entry -> what the page stores per token. */
export function tokenOf(entry) {
  const pairs = (list) => (list ?? []).map((t) => [t.token, t.logprob]);
  return {
    text: entry.token,
    logprob: entry.logprob,
    top: pairs(entry.top_logprobs),
    processed: entry.processed_logprob ?? null,
    processedTop: entry.processed_top_logprobs ? pairs(entry.processed_top_logprobs) : null,
  };
}

const percent = (logprob) => `${(100 * Math.exp(logprob)).toFixed(logprob > Math.log(0.001) ? 1 : 3)}%`;

function likelihood(logprob) {
  const p = Math.exp(logprob);
  return p >= 0.5 ? 'likely' : p >= 0.1 ? 'plausible' : 'unlikely';
}

export function renderTokens(container, tokens) {
  container.replaceChildren(...tokens.map((token, index) => {
    const button = document.createElement('button');
    button.type = 'button';
    button.className = `token ${likelihood(token.logprob)}`;
    button.dataset.index = String(index);
    button.textContent = token.text;
    button.setAttribute('aria-label', `token ${JSON.stringify(token.text)}, probability ${percent(token.logprob)}`);
    return button;
  }));
  container.classList.add('tokens');
}

/** Fill and show the alternatives popover next to `anchor`. */
export function showAlternatives(popover, token, anchor) {
  const after = token.processed === null ? '' : `, ${percent(token.processed)} after sampling settings`;
  const title = `Token ${JSON.stringify(token.text)}: ${percent(token.logprob)} raw${after}`;
  popover.querySelector('h2').textContent = title;
  fillList(popover.querySelector('#alternatives-raw'), token.top, token.text);
  const processed = popover.querySelector('#alternatives-processed');
  if (token.processedTop) fillList(processed, token.processedTop, token.text);
  else processed.replaceChildren(item('not reported by this server'));
  popover.hidden = false;
  const box = anchor.getBoundingClientRect();
  const left = Math.min(box.left, window.innerWidth - popover.offsetWidth - 8);
  const below = box.bottom + 6 + popover.offsetHeight < window.innerHeight;
  popover.style.left = `${Math.max(8, left)}px`;
  popover.style.top = `${below ? box.bottom + 6 : Math.max(8, box.top - popover.offsetHeight - 6)}px`;
  popover.querySelector('button').focus();
}

function fillList(list, pairs, chosen) {
  list.replaceChildren(...pairs.map(([text, logprob]) => {
    const li = item('');
    const label = document.createElement('code');
    label.textContent = JSON.stringify(text);
    const meter = document.createElement('meter');
    meter.min = 0;
    meter.max = 1;
    meter.value = Math.exp(logprob);
    meter.setAttribute('aria-label', `probability of ${JSON.stringify(text)}`);
    const value = document.createElement('span');
    value.className = 'probability';
    value.textContent = percent(logprob);
    li.append(label, meter, value);
    if (text === chosen) li.classList.add('chosen');
    return li;
  }));
}

function item(text) {
  const li = document.createElement('li');
  li.textContent = text;
  return li;
}
