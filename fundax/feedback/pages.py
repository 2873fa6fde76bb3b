"""HTML of the feedback app's pages (inline, so the package needs no data files).

Pages are rendered on the server; every piece of stored text (prompts, rater names) goes
through `html.escape`, and the scripts read ids from data attributes, never from interpolated
script text. Each candidate tile carries a visible SYNTHETIC label on top of the stamp burnt into
the served image.

Keyboard (rating page): Left/Right/Up/Down move the focused tile, 1-5 score it, a / r accept or
reject it, Enter submits the grid. Pairwise page: Left / Right choose that image, Down or t
records a tie.
"""

from __future__ import annotations

import html

from fundax.feedback import store as store_lib

CRITERIA_LABELS = {
    "optic_disc_clarity": "disc unclear",
    "vessel_structure": "vessels implausible",
    "contrast_illumination": "poor contrast / illumination",
    "artifacts": "artefacts",
    "prompt_match": "does not match prompt",
}

_STYLE = """
body{font-family:sans-serif;margin:1em;background:#f4f4f4}
.banner{background:#a00;color:#fff;padding:.3em .6em;font-weight:bold}
.prompt{background:#fff;border:1px solid #ccc;padding:.6em;margin:.6em 0;white-space:pre-wrap}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.tile{background:#fff;border:3px solid #ccc;padding:6px;width:260px;margin:0}
.tile:focus,.tile.focused{border-color:#06c;outline:none}
.tile.done{opacity:.6}
.imgwrap{position:relative}
.imgwrap img{width:256px;height:256px;display:block;image-rendering:auto}
.synthetic{position:absolute;bottom:4px;right:4px;background:#a00;color:#fff;font-size:11px;
  padding:1px 4px;font-weight:bold}
button.sel{background:#06c;color:#fff}
label{display:block;font-size:13px}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ccc;padding:3px 8px}
"""

_RATE_JS = """
const tiles=[...document.querySelectorAll('.tile')];
let focusIdx=0;
const state=tiles.map(()=>({score:null,accept:null,rid:null}));
function rid(){return (self.crypto&&crypto.randomUUID)?crypto.randomUUID():
  Date.now()+'-'+Math.random().toString(36).slice(2);}
function show(i){const t=tiles[i],s=state[i];
  t.querySelectorAll('.score').forEach(b=>b.classList.toggle('sel',+b.dataset.score===s.score));
  t.querySelector('.accept').classList.toggle('sel',s.accept===true);
  t.querySelector('.reject').classList.toggle('sel',s.accept===false);
  t.classList.toggle('done',s.score!==null||s.accept!==null);}
function setFocus(i){if(!tiles.length)return;focusIdx=(i+tiles.length)%tiles.length;
  tiles[focusIdx].focus();}
tiles.forEach((t,i)=>{
  t.addEventListener('focusin',()=>{focusIdx=i;});
  t.querySelectorAll('.score').forEach(b=>b.addEventListener('click',()=>{
    state[i].score=+b.dataset.score;show(i);}));
  t.querySelector('.accept').addEventListener('click',()=>{state[i].accept=true;show(i);});
  t.querySelector('.reject').addEventListener('click',()=>{state[i].accept=false;show(i);});
});
async function post(body){
  for(let attempt=0;attempt<4;attempt++){
    try{const r=await fetch('/api/ratings',{method:'POST',credentials:'same-origin',
        headers:{'Content-Type':'application/json'},body:JSON.stringify(body)});
      if(r.ok)return true;
      if(r.status<500){document.getElementById('status').textContent=
        'Refused: '+(await r.text());return false;}
    }catch(e){}
    await new Promise(res=>setTimeout(res,300*(attempt+1)));
  }
  document.getElementById('status').textContent='Could not reach the server; try again.';
  return false;}
async function submit(){
  const jobs=[];
  tiles.forEach((t,i)=>{const s=state[i];const criteria={};
    t.querySelectorAll('input[data-crit]').forEach(c=>{
      if(c.checked)criteria[c.dataset.crit]=true;});
    if(s.score===null&&s.accept===null&&!Object.keys(criteria).length)return;
    s.rid=s.rid||rid();  // kept across retries so the server can deduplicate
    jobs.push(post({request_id:s.rid,candidate_id:+t.dataset.id,score:s.score,
                    accept:s.accept,criteria:criteria}));});
  if(!jobs.length){document.getElementById('status').textContent=
    'Nothing rated yet: score (1-5) or accept/reject at least one image.';return;}
  const ok=await Promise.all(jobs);
  if(ok.every(x=>x))location.reload();}
document.getElementById('submit')&&document.getElementById('submit').addEventListener(
  'click',submit);
document.addEventListener('keydown',e=>{
  if(e.target.tagName==='INPUT'&&e.target.type!=='checkbox')return;
  const k=e.key;
  if(k>='1'&&k<='5'){state[focusIdx].score=+k;show(focusIdx);}
  else if(k==='a'){state[focusIdx].accept=true;show(focusIdx);}
  else if(k==='r'){state[focusIdx].accept=false;show(focusIdx);}
  else if(k==='ArrowRight'||k==='ArrowDown'){setFocus(focusIdx+1);}
  else if(k==='ArrowLeft'||k==='ArrowUp'){setFocus(focusIdx-1);}
  else if(k==='Enter'){submit();}
  else return;
  e.preventDefault();});
setFocus(0);
"""

_PAIR_JS = """
const box=document.getElementById('pair');
let requestId=null;
async function choose(preferred){
  if(!box)return;
  requestId=requestId||((self.crypto&&crypto.randomUUID)?crypto.randomUUID():
    Date.now()+'-'+Math.random().toString(36).slice(2));
  const r=await fetch('/api/pairwise',{method:'POST',credentials:'same-origin',
    headers:{'Content-Type':'application/json'},body:JSON.stringify({request_id:requestId,
      candidate_a:+box.dataset.a,candidate_b:+box.dataset.b,preferred:preferred})});
  if(r.ok)location.reload();
  else document.getElementById('status').textContent='Refused: '+(await r.text());}
document.querySelectorAll('button[data-pref]').forEach(b=>b.addEventListener('click',
  ()=>choose(b.dataset.pref)));
document.addEventListener('keydown',e=>{
  const pref={ArrowLeft:'a',ArrowRight:'b',ArrowDown:'tie',t:'tie'}[e.key];
  if(pref){e.preventDefault();choose(pref);}});
"""

_ADMIN_JS = """
document.getElementById('new-rater').addEventListener('submit',async e=>{
  e.preventDefault();const f=e.target;
  const r=await fetch('/api/admin/raters',{method:'POST',credentials:'same-origin',
    headers:{'Content-Type':'application/json'},body:JSON.stringify(
      {name:f.name.value,is_admin:f.is_admin.checked})});
  const out=document.getElementById('new-token');
  const j=await r.json();
  out.textContent=r.ok?('Token for '+j.name+' (shown once): '+j.token):('Refused: '+
    JSON.stringify(j.detail));});
"""

_e = html.escape


def _page(title: str, body: str, script: str = "", who: store_lib.Rater | None = None) -> str:
  nav = ""
  if who is not None:
    links = '<a href="/rate">rate</a> | <a href="/rate?mode=pair">compare pairs</a>'
    if who.is_admin:
      links += ' | <a href="/admin">admin</a>'
    nav = (f'<div class="nav">Signed in as <b>{_e(who.name)}</b> | {links} | <form method="post" '
           f'action="/logout" style="display:inline"><button>log out</button></form></div>')
  return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
          f"<style>{_STYLE}</style></head><body><div class='banner'>Synthetic images generated "
          f"by fundax: not photographs of patients</div>{nav}{body}"
          f"<script>{script}</script></body></html>")


def message(text: str) -> str:
  return _page("fundax feedback", f"<p>{_e(text)}</p>")


def login(error: str | None = None) -> str:
  err = f"<p style='color:#a00'>{_e(error)}</p>" if error else ""
  return _page("Log in", f"""<h1>fundax feedback: log in</h1>{err}
<form method="post" action="/login"><label>Rater token
<input name="token" type="password" size="50" autofocus></label>
<button type="submit">Log in</button></form>""")


def _tile(c: dict, url: str) -> str:
  cid = int(c["id"])
  scores = "".join(f'<button type="button" class="score" data-score="{s}">{s}</button>'
                   for s in range(1, 6))
  crits = "".join(f'<label><input type="checkbox" data-crit="{k}"> {_e(v)}</label>'
                  for k, v in CRITERIA_LABELS.items())
  return f"""<figure class="tile" tabindex="0" data-id="{cid}" id="tile-{cid}">
<div class="imgwrap"><img src="{_e(url)}" alt="candidate {cid}">
<span class="synthetic">SYNTHETIC</span></div>
<div>score: {scores}</div>
<div><button type="button" class="accept">accept (a)</button>
<button type="button" class="reject">reject (r)</button></div>{crits}</figure>"""


def rate(who: store_lib.Rater, prompt: str | None, cands: list[tuple[dict, str]], rated: int,
         total: int) -> str:
  """The rating page: the prompt, a grid of its unrated candidates, progress."""
  progress = f'<p id="progress">{rated} / {total} rated</p>'
  if prompt is None:
    return _page("Rate", progress + "<p>Everything is rated. Thank you!</p>", who=who)
  tiles = "".join(_tile(c, url) for c, url in cands)
  body = f"""{progress}<h2>Prompt</h2><div class="prompt" id="prompt">{_e(prompt)}</div>
<p>Keys: arrows move, 1-5 score, a accept, r reject, Enter submits. Tick any problems seen.</p>
<div class="grid">{tiles}</div>
<p><button id="submit" type="button">Submit ratings (Enter)</button>
<span id="status"></span></p>"""
  return _page("Rate", body, _RATE_JS, who)


def pair(who: store_lib.Rater, pair_: list[tuple[dict, str]] | None) -> str:
  """The pairwise page: which of two candidates of one prompt is better."""
  if not pair_:
    return _page("Compare", "<p>No pairs left to compare. Thank you!</p>", who=who)
  (a, url_a), (b, url_b) = pair_
  imgs = "".join(f"""<figure class="tile"><div class="imgwrap"><img src="{_e(u)}"
alt="candidate {int(c['id'])}"><span class="synthetic">SYNTHETIC</span></div>
<button type="button" data-pref="{p}">{label}</button></figure>"""
                 for c, u, p, label in ((a, url_a, "a", "left is better (&larr;)"),
                                        (b, url_b, "b", "right is better (&rarr;)")))
  body = f"""<h2>Which is better for this prompt?</h2>
<div class="prompt" id="prompt">{_e(a['prompt'])}</div>
<div class="grid" id="pair" data-a="{int(a['id'])}" data-b="{int(b['id'])}">{imgs}</div>
<p><button type="button" data-pref="tie">tie (&darr; or t)</button> <span id="status"></span></p>"""
  return _page("Compare", body, _PAIR_JS, who)


def admin(who: store_lib.Rater, progress: list[dict], total: int, agree: dict) -> str:
  """The admin page: progress per rater, agreement, new raters, export."""
  rows = "".join(
      f"<tr><td>{_e(p['rater'])}</td><td>{'yes' if p['simulated'] else ''}</td>"
      f"<td>{p['rated']} / {total}</td><td>{p['ratings']}</td><td>{p['pairs']}</td></tr>"
      for p in progress)
  pairs = "".join(f"<tr><td>{_e(p['a'])}</td><td>{_e(p['b'])}</td><td>{p['n']}</td>"
                  f"<td>{_fmt(p['kappa'])}</td><td>{_fmt(p['kappa_quadratic'])}</td></tr>"
                  for p in agree["pairs"])
  body = f"""<h1>Admin</h1><h2>Progress</h2>
<table id="progress"><tr><th>rater</th><th>simulated</th><th>candidates rated</th>
<th>ratings</th><th>pairs</th></tr>{rows}</table>
<h2>Agreement on scores</h2><table id="agreement">
<tr><td>Fleiss' kappa</td><td>{_fmt(agree['fleiss_kappa'])}</td></tr>
<tr><td>Krippendorff's alpha (ordinal)</td><td>{_fmt(agree['alpha_ordinal'])}</td></tr>
<tr><td>Krippendorff's alpha (interval)</td><td>{_fmt(agree['alpha_interval'])}</td></tr>
<tr><td>candidates scored by 2+ raters</td><td>{agree['units']}</td></tr></table>
<h3>Cohen's kappa per pair of raters</h3><table id="cohen"><tr><th>rater</th><th>rater</th>
<th>shared</th><th>kappa</th><th>quadratic-weighted</th></tr>{pairs}</table>
<h2>New rater</h2><form id="new-rater"><label>name <input name="name" maxlength="100"></label>
<label><input type="checkbox" name="is_admin"> admin</label><button>create</button></form>
<p id="new-token"></p>
<h2>Export</h2><p><a href="/api/admin/export">ratings.jsonl</a> (the Selector training set;
every image in it is synthetic)</p>"""
  return _page("Admin", body, _ADMIN_JS, who)


def _fmt(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.3f}"
