"""The docs render: the processed notebooks become HTML pages (nbdev's processing + nbconvert, since
quarto can't be installed here) and headless Chromium shows the tutorial with its text, tables and plots.
A screenshot is saved to tests/artifacts/ for a person to look at."""
import json, os, shutil, subprocess, sys
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
    return render_html('_docs_html')

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
