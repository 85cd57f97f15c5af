"""The docs render: the processed notebooks become HTML pages (nbdev's processing + nbconvert, since
quarto can't be installed here) and headless Chromium shows the tutorial with its text, tables and plots.
A screenshot is saved to tests/artifacts/ for a person to look at."""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT/'tests'/'artifacts'
sys.path.insert(0, str(ROOT/'tools'))

def _chromium():
    for name in ('chromium', 'chromium-browser', 'google-chrome'):
        if shutil.which(name): return shutil.which(name)

# After load, the page reports what a reader would see: images that decoded, tables, headings, text length.
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.title = 'PROBE' + JSON.stringify({
    imgs: imgs.length, imgs_loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    tables: document.querySelectorAll('table').length,
    h1: [...document.querySelectorAll('h1')].map(h => h.textContent.trim()),
    h2: document.querySelectorAll('h2').length,
    text_len: document.body.innerText.length});
});
</script></body>"""

def _browse(chrome, html, tmp_path, shot):
    flags = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
             '--disable-background-networking', '--disable-component-update', '--disable-sync',
             f'--user-data-dir={tmp_path/"profile"}', '--virtual-time-budget=5000']
    url = html.as_uri()
    dom = subprocess.run([chrome, *flags, '--dump-dom', url], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([chrome, *flags, f'--screenshot={shot}', '--window-size=1280,2400', '--hide-scrollbars', url],
                   capture_output=True, text=True, timeout=120)
    start = dom.index('PROBE') + len('PROBE')
    return json.loads(dom[start:dom.index('</title>', start)].replace('&quot;', '"'))

@pytest.fixture(scope='module')
def pages():
    from docs_no_quarto import render_html
    return render_html('_docs_html', force=True)   # fresh: `_proc/` may hold links of an older module layout

def test_every_notebook_renders(pages):
    nbs = {p.stem for p in (ROOT/'nbs').glob('*.ipynb')}
    html = {p.stem for p in pages.glob('*.html')}
    assert nbs <= html, f"notebooks without a rendered page: {sorted(nbs - html)}"

@pytest.mark.parametrize('page', ['06_tutorial', 'index'])
def test_page_in_browser(pages, page, tmp_path):
    chrome = _chromium()
    if chrome is None: pytest.skip('no chromium on this machine (apt-get install chromium)')
    src = pages/f'{page}.html'
    if not src.exists(): pytest.skip(f'{src.name} not rendered (notebook missing)')
    probe = tmp_path/src.name
    probe.write_text(src.read_text(encoding='utf-8').replace('</body>', PROBE, 1), encoding='utf-8')
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS/f'{page}.png'
    seen = _browse(chrome, probe, tmp_path, shot)
    assert shot.exists() and shot.stat().st_size > 10_000, 'no screenshot'
    assert seen['h1'] and seen['text_len'] > 500, seen
    if page == '06_tutorial':
        # the tutorial shows its plots (show_batch, CMC, retrieval) and result tables
        assert seen['imgs_loaded'] >= 3 and seen['imgs_loaded'] == seen['imgs'], seen
        assert seen['tables'] >= 1, seen


# ---- links: the README's and every rendered page's (issue: the README linked notebooks that were not there)
import re
from html.parser import HTMLParser

DOCS = 'https://reid-fastai.github.io/reid_fastai/'

def _doc_pages() -> dict:
    "Doc page name -> the symbols documented on it, as nbdev names them (`05b_learner.ipynb` -> `learner.html`)"
    from reid_fastai._modidx import d
    pages = {}
    for mod in d['syms'].values():
        for url, _ in mod.values():
            page, _, anchor = url.rpartition('/')[2].partition('#')
            pages.setdefault(page, set()).add(anchor)
    for nb in (ROOT/'nbs').glob('*.ipynb'): pages.setdefault(re.sub(r'^\d\d[a-z]?_', '', nb.stem) + '.html', set())
    return pages

def _check_doc_link(url, pages) -> str|None:
    "Why the docs-site link `url` is broken (its page or its symbol), or None"
    page, _, anchor = url[len(DOCS):].partition('#')
    if page not in pages: return f"{url}: no notebook renders to {page}"
    if anchor and anchor not in pages[page]: return f"{url}: {anchor!r} is not documented on {page}"

def test_readme_links_resolve():
    "Every link of the README: files in the repository exist, docs-site links name a page and a symbol that exist"
    md, pages, bad = (ROOT/'README.md').read_text(), _doc_pages(), []
    for target in re.findall(r'\]\(([^)\s]+)\)', md):
        if target.startswith(DOCS): bad.append(_check_doc_link(target, pages))
        elif not re.match(r'[a-z]+:|#', target) and not (ROOT/target.split('#')[0]).exists(): bad.append(f"{target}: no such file")
    bad = [b for b in bad if b]
    assert not bad, '\n'.join(bad)

class _Links(HTMLParser):
    def __init__(self): super().__init__(); self.hrefs, self.ids = [], set()
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get('id'): self.ids.add(a['id'])
        if tag == 'a' and a.get('href'): self.hrefs.append(a['href'])

def test_rendered_pages_links_resolve(pages):
    "In every rendered page: links to other pages and to anchors land somewhere, docs-site links name existing symbols"
    doc_pages, parsed, bad = _doc_pages(), {}, []
    for html in pages.glob('*.html'):
        parsed[html.name] = p = _Links(); p.feed(html.read_text(encoding='utf-8'))
    for name, p in parsed.items():
        for href in p.hrefs:
            if href.startswith(DOCS): bad.append(_check_doc_link(href, doc_pages)); continue
            if re.match(r'[a-z]+:', href): continue   # other sites, mailto:, data:
            page, _, anchor = href.partition('#')
            target = parsed.get(page or name)
            if target is None: bad.append(f"{name}: {href}: no page {page}")
            elif anchor and anchor not in target.ids: bad.append(f"{name}: {href}: no anchor #{anchor} on {page or name}")
    bad = [b for b in bad if b]
    assert not bad, '\n'.join(bad[:30])
