"""The built documentation site (docs/_build/html, from `make docs`), checked by docs/check_site.py: internal links
resolve, nothing loads from the network, and in headless chromium the default pages load without console errors,
render their equations and images, and the search lists results. Screenshots go to docs/_build/screenshots/.

Skipped when the site is not built unless UAD_REQUIRE_DOCS=1 (`make docs-check`, after `make docs`), and when chromium
is not installed or playwright is not importable unless UAD_REQUIRE_BROWSER=1 (`make docs-check` under CI=true: the
CI machine has Debian's chromium; a user's machine may have no browser, and then these checks say so and skip).
"""
import importlib.util, os
from pathlib import Path

import pytest

pytestmark = pytest.mark.site  # `make docs-check` runs these after `make docs`; `make pytest` leaves them out

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "docs" / "_build" / "html"
SHOTS = ROOT / "docs" / "_build" / "screenshots"
REQUIRE = os.environ.get("UAD_REQUIRE_DOCS") == "1"
REQUIRE_BROWSER = os.environ.get("UAD_REQUIRE_BROWSER") == "1"

_spec = importlib.util.spec_from_file_location("check_site", ROOT / "docs" / "check_site.py")
cs = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(cs)


def _need(ok: bool, why: str, require: bool = REQUIRE, flag: str = "UAD_REQUIRE_DOCS") -> None:
    "Skip with `why` when not ok; fail instead when `require` (its environment variable `flag` is 1)."
    if not ok: (pytest.fail if require else pytest.skip)(why + ("" if require else f" ({flag}=1 fails instead)"))


def _need_browser() -> str:
    "The chromium binary, once playwright is known importable."
    try: import playwright.sync_api  # noqa: F401
    except ImportError: _need(False, "playwright is not importable: make docs installs it", REQUIRE_BROWSER, "UAD_REQUIRE_BROWSER")
    chromium = cs.find_chromium()
    _need(chromium is not None, "chromium is not installed: apt-get install chromium (Debian)", REQUIRE_BROWSER, "UAD_REQUIRE_BROWSER")
    return chromium


def _fail_on(problems: list[str]) -> None:
    "Fail listing the problems (30 at most) when there are any."
    if problems: pytest.fail(f"{len(problems)} problems:\n" + "\n".join(problems[:30]), pytrace=False)


@pytest.fixture(scope="module")
def site() -> Path:
    _need((SITE / "index.html").is_file(), "site not built: run make docs")
    return SITE


@pytest.fixture(scope="module")
def browsed(site) -> dict:
    "browse() over the default pages that exist (all of them under UAD_REQUIRE_DOCS=1), keyed by page."
    chromium = _need_browser()
    pages = [p for p in cs.DEFAULT_PAGES if REQUIRE or (site / p.split("?")[0]).is_file()]
    return {r["page"]: r for r in cs.browse(site, pages, SHOTS, chromium)}


# ---- the checker on a hand-made site: it must be able to fail -------------------------------------------------
@pytest.fixture
def tiny(tmp_path) -> Path:
    "Two pages: good links, a missing file, a missing anchor (in another page and in the same page), CDN assets."
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.html").write_text('<h1 id="sec">B</h1><a name="old"></a><a href="../a.html#top">up</a>')
    (tmp_path / "pic.png").write_bytes(b"")
    (tmp_path / "a.html").write_text(
        '<html><head><script src="https://cdn.example.org/x.js"></script>'
        '<link rel="stylesheet" href="//cdn.example.org/x.css"><link rel="canonical" href="https://example.org/a">'
        '<link rel="stylesheet" href="style.css?v=1"></head>'
        '<body id="top"><a href="sub/b.html#sec">ok</a><a href="sub/b.html#old">ok</a><a href="#top">ok</a><a href="#">ok</a>'
        '<a href="sub/">dir</a><img src="pic.png"><a href="https://example.org">web</a><a href="mailto:x@y.z">mail</a>'
        '<a href="missing.html">bad</a><a href="sub/b.html#nope">bad</a><a href="#gone">bad</a></body></html>')
    (tmp_path / "style.css").write_text("")
    (tmp_path / "sub" / "index.html").write_text("<p>dir index</p>")
    return tmp_path


def test_internal_links_finds_each_broken_link(tiny):
    problems = cs.internal_links(tiny)
    assert len(problems) == 3, problems
    assert "a.html: <a href='missing.html'>: missing.html does not exist" in problems
    assert "a.html: <a href='sub/b.html#nope'>: no id 'nope' in sub/b.html" in problems
    assert "a.html: <a href='#gone'>: no id 'gone' in a.html" in problems


def test_external_requests_finds_cdn_assets(tiny):
    problems = cs.external_requests(tiny)
    assert len(problems) == 2, problems  # a canonical link and <a href="https://..."> load nothing
    assert any("https://cdn.example.org/x.js" in p for p in problems)
    assert any("//cdn.example.org/x.css" in p for p in problems)


def test_browse_reports_errors_network_and_broken_images(tmp_path):
    chromium = _need_browser()
    (tmp_path / "p.html").write_text('<script>console.error("boom")</script><img src="nope.png">'
                                     '<script src="https://cdn.example.org/x.js"></script><p class="math">x</p>')
    (rec,) = cs.browse(tmp_path, ["p.html"], tmp_path / "shots", chromium)
    assert any("boom" in m for m in rec["console_errors"]), rec
    assert rec["external_requests"] == ["https://cdn.example.org/x.js"], rec
    assert rec["broken_images"] == ["nope.png"], rec
    assert Path(rec["screenshot"]).is_file()
    problems = cs.page_problems(rec, need_math=True)
    assert any("no equation rendered" in p for p in problems) and any("1 math elements" in p for p in problems)
    (gone,) = cs.browse(tmp_path, ["gone.html"], tmp_path / "shots", chromium)
    assert cs.page_problems(gone) == ["gone.html: page does not exist"]


# ---- the built site ----------------------------------------------------------------------------------------
def test_no_broken_internal_links(site):
    _fail_on(cs.internal_links(site))


def test_nothing_loaded_from_the_network(site):
    _fail_on(cs.external_requests(site))


def test_default_pages_exist(site):
    missing = [p for p in cs.DEFAULT_PAGES if not (site / p.split("?")[0]).is_file()]
    _need(not missing, f"pages not built yet: {missing}")


def test_pages_load_without_errors(browsed):
    _fail_on([p for r in browsed.values() for p in cs.page_problems(r)])


def test_no_request_leaves_the_machine(browsed):
    _fail_on([f"{r['page']}: {u}" for r in browsed.values() for u in r["external_requests"]])


def test_equations_rendered(browsed):
    for page in cs.MATH_PAGES:
        r = browsed[page]
        assert r["mathjax"] and r["mjx_containers"] > 0 and not r["mjx_errors"], r
        assert r["mjx_containers"] >= r["math_nodes"], r


def test_images_load(browsed):
    _fail_on([f"{r['page']}: {src}" for r in browsed.values() for src in r["broken_images"]])


def test_search_lists_results(browsed):
    (page,) = [p for p in browsed if p.startswith("search.html?q=")]
    assert browsed[page]["search_results"], browsed[page]


def test_screenshots_written(browsed):
    for r in browsed.values():
        assert r["screenshot"] and Path(r["screenshot"]).stat().st_size > 10_000, r
        assert Path(r["screenshot"]).parent == SHOTS
