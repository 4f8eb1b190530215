"""Check the built documentation site (docs/_build/html): internal links, nothing loaded from the network, and a
headless-browser pass over a few pages (console errors, MathJax, images, search) with screenshots.

    python docs/check_site.py docs/_build/html --shots docs/_build/screenshots [--pages index.html ...]

Exits non-zero and lists the problems when a check fails. The browser is Debian's `chromium` driven by Playwright
(`pip install playwright`; its own browser downloads are not used). Importable: tests/test_docs_site.py uses it.
"""
from __future__ import annotations
import argparse, os, re, shutil, sys, time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Pages the browser check opens by default (paths relative to the site; a `?query` is passed to the page).
DEFAULT_PAGES = ["index.html", "nbs/05a_losses.html", "nbs/21_study_trivae.html", "api/index.html",
                 "generated/results.html", "search.html?q=anomaly"]
MATH_PAGES = {"nbs/05a_losses.html"}  # must show rendered equations (mjx-container elements)
LINK_ATTRS = {"a": "href", "area": "href", "link": "href", "script": "src", "img": "src", "iframe": "src",
              "source": "src", "video": "src", "audio": "src", "embed": "src"}  # the attribute that points elsewhere
SKIP_SCHEMES = {"http", "https", "mailto", "data", "javascript", "tel", "ftp"}  # not files of this site
LOCAL_SCHEMES = {"file", "data", "about", "blob"}  # what the browser may load; anything else is the network
# <link rel=...> values that load nothing (navigation hints only); every other <link> is fetched by the browser
NAV_RELS = {"canonical", "alternate", "search", "index", "next", "prev", "author", "license", "help", "copyright",
            "top", "up", "first", "last", "bookmark", "me"}


class _Page(HTMLParser):
    "Collects the anchors (`id`/`name`) of one HTML page and its links as (tag, attribute, value, rel)."
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids, self.links = set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("id", "name") if tag in ("a", "map") else ("id",):  # `name` anchors are a/map only
            if a.get(k): self.ids.add(a[k])
        if tag in LINK_ATTRS and a.get(LINK_ATTRS[tag]) is not None:
            self.links.append((tag, LINK_ATTRS[tag], a[LINK_ATTRS[tag]].strip(), (a.get("rel") or "").lower().split()))

    handle_startendtag = handle_starttag


def _parse(path: Path) -> _Page:
    "Parse one HTML file."
    p = _Page(); p.feed(path.read_text(encoding="utf-8", errors="replace")); p.close()
    return p


def _pages(html_dir: Path) -> dict[Path, _Page]:
    "Every page of the site, parsed, keyed by resolved path (_static/ holds the themes' Jinja templates, not pages)."
    root = Path(html_dir).resolve()
    return {f: _parse(f) for f in sorted(root.rglob("*.html")) if f.relative_to(root).parts[0] != "_static"}


def scan_links(html_dir: Path,  # the built site
               pages: dict | None = None,  # _pages(html_dir) when already parsed
               ) -> tuple[list[str], int]:
    "(problems, number of internal links checked): every internal href/src must resolve, fragments included."
    root = Path(html_dir).resolve()
    pages, problems, n = pages or _pages(root), [], 0
    for f, page in pages.items():
        rel = f.relative_to(root).as_posix()
        for tag, attr, url, _ in page.links:
            u = urlsplit(url)
            if u.scheme.lower() in SKIP_SCHEMES or url.startswith("//"): continue
            n += 1
            where = f"{rel}: <{tag} {attr}={url!r}>"
            if u.scheme: problems.append(f"{where}: unexpected URL scheme {u.scheme!r}"); continue
            if u.path.startswith("/"): problems.append(f"{where}: absolute path (breaks once the site is moved)"); continue
            target = Path(os.path.normpath(f.parent / unquote(u.path))) if u.path else f  # `..` folded, links kept
            if not target.is_relative_to(root): problems.append(f"{where}: points outside the site"); continue
            if target.is_dir(): target = target / "index.html"
            if not target.exists():
                problems.append(f"{where}: {target.relative_to(root).as_posix()} does not exist"); continue
            if not u.fragment or target.suffix != ".html": continue  # `#` alone is the top of the page
            ids = pages[target].ids if target in pages else _parse(target).ids
            if u.fragment not in ids and unquote(u.fragment) not in ids:
                problems.append(f"{where}: no id {unquote(u.fragment)!r} in {target.relative_to(root).as_posix()}")
    return problems, n


def internal_links(html_dir: Path,  # the built site
                   ) -> list[str]:
    "Problems with internal links (file, link, why); [] when every one resolves."
    return scan_links(html_dir)[0]


def external_requests(html_dir: Path,  # the built site
                      pages: dict | None = None,  # _pages(html_dir) when already parsed
                      ) -> list[str]:
    "Every script, stylesheet/preload/icon <link>, image or frame in any page that would be fetched from the network."
    root, problems = Path(html_dir).resolve(), []
    for f, page in (pages or _pages(root)).items():
        for tag, attr, url, rel in page.links:
            if tag in ("a", "area") or (tag == "link" and rel and set(rel) <= NAV_RELS): continue  # followed, not loaded
            if url.startswith("//") or urlsplit(url).scheme.lower() in ("http", "https"):
                problems.append(f"{f.relative_to(root).as_posix()}: <{tag} {attr}={url!r}> loads from the network")
    return problems


def find_chromium() -> str | None:
    "Debian's chromium binary, or None."
    return next((c for c in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if c and Path(c).is_file()), None)


def shot_name(page: str) -> str:
    "Screenshot file name of a page: `/` -> `__`, any other character outside [A-Za-z0-9_.-] -> `_`."
    return re.sub(r"[^\w.-]", "_", page.replace("/", "__")) + ".png"


_IMAGES_JS = """async () => {  // lazy images made eager, then wait (5 s at most) for every image to settle
  const imgs = [...document.images];
  imgs.forEach(i => { if (i.loading === 'lazy') i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => {
    i.addEventListener('load', r, {once: true}); i.addEventListener('error', r, {once: true}); setTimeout(r, 5000); })));
  return {n: imgs.length, broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'))};
}"""
_MATHJAX_JS = """async () => {  // wait for MathJax's first typesetting when the page loads it
  if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) return false;
  await MathJax.startup.promise; await document.fonts.ready; return true;
}"""
_SEARCH_DONE_JS = """() => {  // Sphinx's searchtools writes this status once every result is listed
  const s = document.querySelector('#search-results .search-summary');
  return s && /Search finished|did not match/.test(s.innerText);
}"""


def browse(html_dir: Path,  # the built site
           pages: list[str],  # paths relative to html_dir, optionally with `?query` (e.g. search.html?q=anomaly)
           shots_dir: Path,  # where the full-page PNG screenshots go (created)
           chromium: str | None = None,  # the browser binary; None: find_chromium()
           max_height: int = 12000,  # screenshots stop at this many pixels of page height
           timeout_ms: int = 60000,  # for loading a page, MathJax and search each
           ) -> list[dict]:
    "Open each page in headless chromium with the network blocked; one dict of observations per page."
    from playwright.sync_api import sync_playwright
    root, shots = Path(html_dir).resolve(), Path(shots_dir)
    shots.mkdir(parents=True, exist_ok=True)
    chromium = chromium or find_chromium()
    if not chromium: raise FileNotFoundError("chromium not found: apt-get install chromium")
    out = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium)
        try:
            for page_path in pages:
                u = urlsplit(page_path)
                file = root / u.path
                rec = dict(page=page_path, missing=not file.is_file(), console_errors=[], page_errors=[],
                           failed_requests=[], external_requests=[], error=None, mathjax=False, math_nodes=0,
                           mjx_containers=0, mjx_errors=0, images=0, broken_images=[], search_results=None,
                           screenshot=None, seconds=0.0)
                out.append(rec)
                if rec["missing"]: continue
                t0 = time.perf_counter()
                ctx = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
                # the network is off limits: anything but file:/data:/about:/blob: is recorded and aborted
                ctx.route(re.compile(r"^(?!(file|data|about|blob):)"), lambda route: route.abort("blockedbyclient"))
                page = ctx.new_page()
                local = lambda url: urlsplit(url).scheme.lower() in LOCAL_SCHEMES
                page.on("console", lambda m: m.type == "error" and rec["console_errors"].append(
                    f"{m.text} ({m.location.get('url', '')}:{m.location.get('lineNumber', '')})"))
                page.on("pageerror", lambda e: rec["page_errors"].append(str(e)))
                page.on("request", lambda r: local(r.url) or rec["external_requests"].append(r.url))
                page.on("websocket", lambda w: rec["external_requests"].append(w.url))
                page.on("requestfailed", lambda r: local(r.url) and rec["failed_requests"].append(
                    f"{r.url}: {r.failure}"))
                try:
                    page.goto(file.as_uri() + (f"?{u.query}" if u.query else ""), wait_until="load", timeout=timeout_ms)
                    page.set_default_timeout(timeout_ms)
                    rec["mathjax"] = page.evaluate(_MATHJAX_JS)
                    if u.query and page.query_selector("#search-results") is not None:
                        page.wait_for_function(_SEARCH_DONE_JS, timeout=timeout_ms)
                        rec["search_results"] = page.locator("#search-results ul.search > li").count()
                    img = page.evaluate(_IMAGES_JS)
                    rec["images"], rec["broken_images"] = img["n"], img["broken"]
                    rec["math_nodes"] = page.locator(".math").count()  # Sphinx's math spans/divs
                    rec["mjx_containers"] = page.locator("mjx-container").count()
                    rec["mjx_errors"] = page.locator("mjx-merror").count()  # TeX MathJax could not render
                    shot = shots / shot_name(page_path)
                    height = page.evaluate("document.documentElement.scrollHeight")
                    page.screenshot(path=str(shot), full_page=True,
                                    clip={"x": 0, "y": 0, "width": 1280, "height": max(1, min(height, max_height))})
                    rec["screenshot"] = str(shot)
                except Exception as e:  # a timeout or a crash is reported for the page, the others still run
                    rec["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
                finally:
                    ctx.close()
                    rec["seconds"] = round(time.perf_counter() - t0, 2)
        finally:
            browser.close()
    return out


def _collapse(lines: list[str]) -> list[str]:
    "Messages that differ only in a file URL or a quoted name kept once, with how many there were."
    groups: dict[str, list[str]] = {}
    for m in lines: groups.setdefault(re.sub(r"file://\S+|'[^']*'", "...", m), []).append(m)
    return [g[0] + (f"  [and {len(g) - 1} more like it]" if len(g) > 1 else "") for g in groups.values()]


def page_problems(rec: dict,  # one dict from browse()
                  need_math: bool = False,  # the page must show rendered equations
                  ) -> list[str]:
    "The problems one browse() record shows; [] for a good page."
    p, bad = rec["page"], []
    if rec["missing"]: return [f"{p}: page does not exist"]
    if rec["error"]: bad.append(f"{p}: {rec['error']}")
    seen = rec["failed_requests"] + rec["external_requests"]  # Chromium logs each of them once more as a console error
    bad += [f"{p}: console error: {m}" for m in rec["console_errors"]
            if not (m.startswith("Failed to load resource") and any(u.split(": ")[0] in m for u in seen))]
    bad += [f"{p}: page error: {m}" for m in rec["page_errors"]]
    bad += [f"{p}: failed request: {m}" for m in rec["failed_requests"]]
    bad += [f"{p}: network request (blocked): {m}" for m in rec["external_requests"]]
    bad += [f"{p}: image did not load: {m}" for m in rec["broken_images"]]
    if rec["mjx_containers"] < rec["math_nodes"]:
        bad.append(f"{p}: {rec['math_nodes']} math elements but {rec['mjx_containers']} rendered by MathJax")
    if need_math and not rec["mjx_containers"]: bad.append(f"{p}: no equation rendered (no mjx-container)")
    if rec["mjx_errors"]: bad.append(f"{p}: {rec['mjx_errors']} MathJax errors (mjx-merror)")
    if "q=" in urlsplit(p).query and not rec["search_results"]:
        bad.append(f"{p}: the search listed no result ({rec['search_results']})")
    return _collapse(bad)


def main(argv: list[str] | None = None) -> int:
    "Command line: run the three checks, print a report, return 1 when any check fails."
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html_dir", type=Path, help="the built site (docs/_build/html)")
    ap.add_argument("--shots", type=Path, default=Path("docs/_build/screenshots"), help="screenshot folder")
    ap.add_argument("--pages", nargs="+", default=DEFAULT_PAGES, help="pages for the browser (relative to html_dir)")
    ap.add_argument("--allow-missing", action="store_true", help="skip pages that do not exist instead of failing")
    ap.add_argument("--chromium", help="the chromium binary (default: found on PATH or /usr/bin/chromium)")
    ap.add_argument("--no-browser", action="store_true", help="links and external URLs only")
    a = ap.parse_args(argv)
    if not (a.html_dir / "index.html").is_file(): ap.error(f"{a.html_dir}/index.html does not exist: run make docs")
    t0 = time.perf_counter()
    parsed = _pages(a.html_dir)
    links, n_links = scan_links(a.html_dir, parsed)
    external = external_requests(a.html_dir, parsed)
    print(f"links: {n_links} internal links in {len(parsed)} pages, {len(links)} broken; "
          f"{len(external)} network URLs in script/link tags ({time.perf_counter() - t0:.1f} s)")
    problems = links + external
    if not a.no_browser:
        pages = [p for p in a.pages if not (a.allow_missing and not (a.html_dir / urlsplit(p).path).is_file())]
        t1 = time.perf_counter()
        recs = browse(a.html_dir, pages, a.shots, a.chromium)
        print(f"browser: {len(recs)} pages in {time.perf_counter() - t1:.1f} s")
        for r in recs:
            extra = "" if r["search_results"] is None else f", {r['search_results']} search results"
            print(f"  {r['page']}: " + ("MISSING" if r["missing"] else
                  f"{r['mjx_containers']} MathJax elements, {r['images']} images{extra}, {r['seconds']} s -> {r['screenshot']}"))
            problems += page_problems(r, need_math=r["page"] in MATH_PAGES)
    if problems:
        print(f"\n{len(problems)} problems:", *problems, sep="\n  ")
        return 1
    print("site OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
