const DATA = JSON.parse(document.getElementById('prism-data').textContent);
const state = Object.fromEntries(new URLSearchParams(location.hash.slice(1)));
function cell(tr, text, cls) { const td = document.createElement('td'); td.textContent = text;
  if (cls) td.className = cls; tr.appendChild(td); return td; }
function fmt(v, d) { return (v === null || v === undefined || Number.isNaN(v)) ? '–' : Number(v).toPrecision(d || 3); }
function render(box) {
  const exp = DATA.explain[box.dataset.exp], mode = box.querySelector('select').value;
  const q = box.querySelector('input').value.toLowerCase(), key = box.dataset.sort || 'rank';
  const dir = box.dataset.dir === 'desc' ? -1 : 1;
  let rows = (exp[mode] || []).filter(r => JSON.stringify(r).toLowerCase().includes(q));
  rows.sort((a, b) => (a[key] > b[key] ? 1 : a[key] < b[key] ? -1 : 0) * dir);
  const body = box.querySelector('tbody'); body.innerHTML = '';
  for (const r of rows) {
    const tr = document.createElement('tr'); tr.dataset.row = r.row;
    cell(tr, r.rank, 'num'); cell(tr, r.id); cell(tr, r.subtask);
    const lab = cell(tr, r.label == null ? '–' : (r.label ? 'harmful' : 'clean'));
    if (r.label) lab.className = 'harm';
    cell(tr, fmt(r.score), 'num'); cell(tr, r.prompt); cell(tr, r.completion);
    const top = r.pairs[0] || {};
    cell(tr, top.id ? `${top.id} (${top.subtask}): ${top.prompt}` : '–'); cell(tr, top.share === undefined ? '–' :
      (100 * top.share).toFixed(0) + '%', 'num');
    const more = cell(tr, ''), d = document.createElement('details'), s = document.createElement('summary');
    s.textContent = r.pairs.length + ' pairs'; d.appendChild(s);
    for (const p of r.pairs) { const div = document.createElement('div');
      div.textContent = `${p.id} ${fmt(p.contribution)} (${(100 * p.share).toFixed(0)}%): ${p.prompt}` +
        ` | + ${p.chosen} | - ${p.rejected}`;
      d.appendChild(div); }
    const rest = document.createElement('div'); rest.className = 'muted';
    rest.textContent = 'other pairs: ' + fmt(r.other_pairs); d.appendChild(rest); more.appendChild(d);
    body.appendChild(tr);
  }
  box.querySelector('.count').textContent = rows.length + ' rows';
}
for (const box of document.querySelectorAll('.explain')) {
  box.querySelector('input').value = state.q || '';
  if (state.sort) { box.dataset.sort = state.sort; box.dataset.dir = state.dir || 'asc'; }
  box.querySelector('input').addEventListener('input', () => render(box));
  box.querySelector('select').addEventListener('change', () => render(box));
  for (const th of box.querySelectorAll('th[data-key]')) th.addEventListener('click', () => {
    box.dataset.dir = box.dataset.sort === th.dataset.key && box.dataset.dir !== 'desc' ? 'desc' : 'asc';
    box.dataset.sort = th.dataset.key; render(box); });
  render(box);
}
document.body.dataset.rendered = 'yes';
