"""Sphinx configuration of the uad_study documentation site: `make docs` builds it into docs/_build/html.

Offline by design: notebooks are rendered from what they have saved (no execution at build time), MathJax is
served from `_static/mathjax/` (put there by `fetch_mathjax.py`), no intersphinx, no CDN script or stylesheet.

Notebooks stay where they are: `docs/nbs` is a committed symlink to `../nbs` (Sphinx and myst-nb read only files
under the source folder, and follow symlinks), and `docs/figures` one to `../figures`, so the paths the notebooks
and the README use for figures (`../figures/...` from nbs/, `figures/...` from the root) resolve unchanged. (The
repository root as source folder would do the same without links, but every run, data and .venv folder would
then have to be excluded, and the site's pages would sit under docs/.)
"""
from __future__ import annotations
import ast, dataclasses, importlib, inspect, json, os, pkgutil, re, sys, textwrap
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout's uad_study/, whatever the environment has installed
import uad_study  # noqa: E402

project = "uad_study"
author = "uad_study developers"
copyright = "uad_study developers (Apache-2.0)"
version = release = uad_study.__version__

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.viewcode", "sphinx.ext.mathjax", "sphinxcontrib.bibtex"]
root_doc = "index"
# figures/ is reached through the symlink for images only; a leading "_" keeps a notebook out of the site.
exclude_patterns = ["_build", "figures", "nbs/_*", "**/.ipynb_checkpoints"]

# Notebooks (myst-nb): the outputs they have saved, nothing executed; no widget manager or require.js from a CDN.
nb_execution_mode = "off"
nb_ipywidgets_js = {}
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3  # README-style links to headings (`#repeatable-numbers`)

# API reference: autodoc imports uad_study (this checkout); each module's public names are its `__all__`.
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource", "no-value": True}
autodoc_typehints = "signature"
add_module_names = False

bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "plain"
bibtex_reference_style = "author_year"

# HTML: sphinx-book-theme, MathJax 3 from this site.
html_theme = "sphinx_book_theme"
html_title = "uad_study"
html_static_path = ["_static"]
html_theme_options = {"show_toc_level": 2, "use_download_button": True, "use_fullscreen_button": False,
                      "launch_buttons": {}, "navigation_with_keys": False}
# the theme's mode on a first visit (an empty one logs a console error), and no result snippets on the search page: they
# are fetched per result, which a browser refuses for a site opened from files (one CORS error per result)
html_context = {"default_mode": "auto"}
html_show_search_summary = False
mathjax_path = "mathjax/tex-mml-chtml.js"  # relative to _static/ of the built site

if not (DOCS / "_static" / "mathjax" / "tex-mml-chtml.js").is_file():
    raise RuntimeError("docs/_static/mathjax/ is missing: run `make docs` (or `python docs/fetch_mathjax.py`) first")


# ---- API pages: one per module of uad_study, generated here into docs/api/ (git-ignored) ----------------------
def _chapter_of(mod_name: str) -> str | None:
    "The notebook (nbs/X.ipynb stem) that exports module `mod_name`, from nbdev's header line in its source."
    src = Path(importlib.import_module(mod_name).__file__).read_text()
    m = re.search(r"File to edit: \.\./(?:\.\./)*nbs/([\w.-]+)\.ipynb", src)
    return m.group(1) if m else None


def _summary(doc: str | None) -> str:
    "The first paragraph of a module docstring, for a Markdown table cell."
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ").replace("|", "\\|")


def _directive(obj) -> str:
    "The autodoc directive for a module-level object."
    if inspect.isclass(obj): return "autoexception" if issubclass(obj, BaseException) else "autoclass"
    return "autofunction" if inspect.isroutine(obj) else "autodata"


def _write_if_changed(path: Path, text: str) -> None:
    "Write `text` unless the file already holds it (an unchanged page keeps its mtime)."
    if not path.is_file() or path.read_text() != text: path.write_text(text)


def write_api_pages() -> list[str]:
    "Write api/<module>.md for every public module with an `__all__`, and api/index.md; return the module names."
    mods = [m.name for m in pkgutil.walk_packages(uad_study.__path__, "uad_study.")
            if not m.name.rsplit(".", 1)[-1].startswith("_")]
    mods = [m for m in mods if getattr(importlib.import_module(m), "__all__", None)]
    out = DOCS / "api"; out.mkdir(exist_ok=True)
    rows = []
    for m in mods:
        nb, mod = _chapter_of(m), importlib.import_module(m)
        where = f"Defined in the chapter {{doc}}`/nbs/{nb}` (`nbs/{nb}.ipynb`), with its prose, equations and examples." if nb else ""
        # a name this module re-exports from another uad_study module is documented once, where it is defined
        home = {n: getattr(getattr(mod, n), "__module__", m) for n in mod.__all__}
        moved = [n for n in mod.__all__ if home[n] != m and str(home[n]).startswith("uad_study.")]
        also = ("\n\nAlso exported here: " + ", ".join(f"{{py:obj}}`{n} <{home[n]}.{n}>`" for n in moved) + ".") if moved else ""
        # one directive per name, in `__all__` order (the chapter's order); an explicit `:members:` list on automodule
        # would be replaced by autodoc_default_options' members=True
        body = "".join(f"\n.. {_directive(getattr(mod, n))}:: {m}.{n}\n" for n in mod.__all__ if n not in moved)
        _write_if_changed(out / f"{m}.md", f"# {m}\n\n{where}{also}\n\n```{{eval-rst}}\n.. automodule:: {m}\n   :no-members:\n{body}```\n")
        rows.append(f"| {{doc}}`{m} <{m}>` | {f'{{doc}}`{nb} </nbs/{nb}>`' if nb else ''} | {_summary(mod.__doc__)} |")
    index = ("# API reference\n\nSignatures and docstrings of what each library module exports (its `__all__`), "
             "generated from the library (`uad_study/`). Below each docstring, the signature as written in the source "
             "shows the comment on each parameter; `[source]` links to the highlighted module.\n\n"
             "| module | chapter | what |\n|---|---|---|\n" + "\n".join(rows) +
             "\n\n```{toctree}\n:hidden:\n\n" + "\n".join(mods) + "\n```\n")
    _write_if_changed(out / "index.md", index)
    for stale in set(p.stem for p in out.glob("uad_study.*.md")) - set(mods): (out / f"{stale}.md").unlink()
    return mods


API_MODULES = write_api_pages()


# ---- generated pages (docs/generated/, git-ignored): the results page and the CLI reference ----------------------
def write_generated_pages() -> None:
    "results.md from every run folder the site knows (smoke runs executed for it, committed cpu runs, RUNS); cli.md."
    from uad_study.docsite import STUDY_RE, cli_reference, results_page
    out = DOCS / "generated"; out.mkdir(exist_ok=True)
    runs = [(f"smoke run of the docs build", d) for d in sorted((EXEC_DIR / "runs").glob("2[0-9]_study_*"))
            if (d / "metrics.json").is_file()]
    runs += [(f"figures/{d.name} (committed)", d) for d in sorted((ROOT / "figures").glob("*-cpu")) if (d / "config.json").is_file()]
    runs += [(str(r.relative_to(ROOT)) if r.is_relative_to(ROOT) else str(r), r) for r in USER_RUNS]
    chapters = {STUDY_RE.match(p.stem).group(1): p.stem for p in (ROOT / "nbs").glob("2[0-9]_study_*.ipynb")}
    chapters["quickstart"] = chapters.get("quickstart", "20_study_quickstart")
    results_page(runs, out, chapters)
    _write_if_changed(out / "cli.md", cli_reference())



# ---- nbdev notebooks: cell directives become myst-nb tags, each library chapter links to its API page ---------
_DIRECTIVE = re.compile(r"^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")
_TAGS = {("hide", ""): "remove-cell", ("include", "false"): "remove-cell",
         ("echo", "false"): "remove-input", ("output", "false"): "remove-output"}


def nbdev_cells(nb: dict) -> dict:
    "`#| hide` cells removed, `#| echo: false` / `#| output: false` mapped to myst-nb tags, directive lines dropped."
    cells = []
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            lines = "".join(c["source"]).splitlines(keepends=True)
            n = 0
            while n < len(lines) and _DIRECTIVE.match(lines[n]): n += 1
            tags = c.setdefault("metadata", {}).setdefault("tags", [])
            for line in lines[:n]:
                name, arg = _DIRECTIVE.match(line).groups()
                tag = _TAGS.get((name, arg.lower()))
                if tag and tag not in tags: tags.append(tag)
            c["source"] = "".join(lines[n:]).strip("\n")
            if not c["source"] and not c.get("outputs"): continue
        cells.append(c)
    nb["cells"] = cells
    return nb


def _default_exp(nb: dict) -> str | None:
    for c in nb["cells"]:
        m = re.search(r"^\s*#\s*\|\s*default_exp\s+([\w.]+)", "".join(c["source"]), re.M) if c["cell_type"] == "code" else None
        if m: return f"uad_study.{m.group(1)}"
    return None


# Images a notebook shows but that are not committed yet: the page says so instead of failing the build. Every
# other missing image is an error. Remove an entry once its file is in git.
MISSING_IMAGES: dict[str, str] = {}


def missing_images(nb: dict) -> dict:
    "Markdown images in MISSING_IMAGES whose file is absent become a visible note."
    for c in nb["cells"]:
        if c["cell_type"] != "markdown": continue
        def note(m):
            try: path = (ROOT / "nbs" / m.group(2)).resolve().relative_to(ROOT).as_posix()
            except ValueError: return m.group(0)
            if path not in MISSING_IMAGES or (ROOT / path).is_file(): return m.group(0)
            return f"\n:::{{warning}}\nFigure not committed yet: `{path}` ({MISSING_IMAGES[path]}).\n:::\n"
        c["source"] = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", note, "".join(c["source"]))
    return nb


# ---- executed copies (uad_study.docsite): every chapter page shows the outputs of a run of the code it documents ----
from uad_study.docsite import EXECUTED, executed_meta, notebook_key, run_page  # noqa: E402

EXEC_DIR = ROOT / EXECUTED
# `make docs RUNS="runs/arch-cpu ..."`: those run folders' chapters are shown with that run's outputs instead of smoke
USER_RUNS = [Path(r).resolve() for r in os.environ.get("UAD_DOCS_RUNS", "").split()]
RUN_PAGES = {}
for _r in USER_RUNS:
    _src, _dst, _profile = run_page(_r, EXEC_DIR)
    RUN_PAGES[_src.stem] = (_dst, _profile, _r)


def executed_copy(stem: str) -> tuple[dict | None, str]:
    "The executed notebook to show for chapter `stem` and the note that heads its page ('' for a current library copy)."
    src = ROOT / "nbs" / f"{stem}.ipynb"
    if stem in RUN_PAGES: dst, profile, run = RUN_PAGES[stem]; extra = f"{profile} {run}"
    else: dst, profile, run, extra = EXEC_DIR / f"{stem}.ipynb", "smoke", None, "smoke " if STUDY.match(stem) else ""
    meta = executed_meta(dst)
    if meta.get("key") != notebook_key(src, extra=extra):
        return None, (":::{warning}\nThis page shows the chapter **without outputs**: its executed copy is missing or "
                      "older than the code (`make docs` executes what is stale).\n:::")
    nb = json.loads(dst.read_text())
    if not STUDY.match(stem): return nb, ""
    where = f"the run folder `{Path(run).relative_to(ROOT) if run.is_relative_to(ROOT) else run}`" if run else "the docs' own smoke run"
    what = ("a test that the chapter's path works on the embedded data in minutes, **not a result**: the `cpu` "
            "runs' numbers are on the {doc}`results page </generated/results>`") if profile == "smoke" else \
           f"the `{profile}` profile's results"
    return nb, (f":::{{note}}\nOutputs of the **`{profile}` profile** ({where}; executed {meta.get('executed', '?')}, commit "
                f"`{meta.get('git_commit', '?')}`, {meta.get('seconds', '?')} s): {what}. Every output on this page comes from "
                "this one run.\n:::")


STUDY = re.compile(r"^2\d_study_\w+$")


def on_source_read(app, docname: str, source: list[str]) -> None:
    "Render nbdev notebooks as nbdev's own docs would (see nbdev_cells), from their executed copy, each chapter linked to its API page."
    if not (docname.startswith("nbs/") and str(app.env.doc2path(docname)).endswith(".ipynb")): return
    nb, note = executed_copy(docname[len("nbs/"):])
    nb = nb or json.loads(source[0])
    mod = _default_exp(nb)
    nb = missing_images(nbdev_cells(nb))
    # a few notebooks carry no kernelspec (jupytext `notebook_metadata_filter: -all`): their code is Python too
    nb["metadata"].setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    if mod in API_MODULES:
        at = next((i + 1 for i, c in enumerate(nb["cells"]) if c["cell_type"] == "markdown"), 0)
        nb["cells"].insert(at, {"cell_type": "markdown", "id": "uad-docs-api-link", "metadata": {},
                                "source": f"**API reference:** {{doc}}`{mod} </api/{mod}>` (signatures, docstrings, "
                                          f"per-parameter comments of what this chapter exports)."})
    if note:
        at = next((i + 1 for i, c in enumerate(nb["cells"]) if c["cell_type"] == "markdown"), 0)
        nb["cells"].insert(at, {"cell_type": "markdown", "id": "uad-docs-run-note", "metadata": {}, "source": note})
    source[0] = json.dumps(nb)


# ---- docstrings: nbdev writes them in Markdown; autodoc reads reStructuredText ---------------------------------
_INLINE = re.compile(r"(`[^`]+`|\$[^$]+\$)")


def md_to_rst(line: str) -> str:
    "`code` -> literal, $x$ -> :math:, and every other reST markup character escaped (docstrings are plain prose)."
    out = []
    for part in _INLINE.split(line):
        if part.startswith("`") and part.endswith("`") and len(part) > 1: out.append(rf"\ ``{part[1:-1]}``\ ")
        elif part.startswith("$") and part.endswith("$") and len(part) > 1: out.append(rf"\ :math:`{part[1:-1]}`\ ")
        else: out.append(re.sub(r"([\\*|_`])", r"\\\1", part))
    return "".join(out)


def source_signature(obj) -> list[str]:
    "The signature lines as written in the source (with nbdev's per-parameter comments); [] when it has none."
    target = obj.fget if isinstance(obj, property) else inspect.unwrap(obj) if callable(obj) else None
    if target is None: return []
    try: src = textwrap.dedent(inspect.getsource(target))
    except (OSError, TypeError): return []
    lines = src.splitlines()
    try: node = ast.parse(src).body[0]
    except (SyntaxError, IndexError): return []

    def head(n) -> list[str]:  # the def/class statement without decorators, up to its body
        return lines[n.lineno - 1:max(n.lineno, n.body[0].lineno - 1)]

    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)): sig = head(node)
    elif isinstance(node, ast.ClassDef):
        sig = head(node)
        fields = [n for n in node.body if isinstance(n, ast.AnnAssign)] if dataclasses.is_dataclass(target) else []
        if fields:
            span = set().union(*(range(f.lineno - 1, f.end_lineno) for f in fields))
            lo, hi = min(span), max(span)
            sig += [l for i, l in enumerate(lines[lo:hi + 1], lo) if i in span or l.strip().startswith("#")]
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is not None: sig += head(init)
    else: return []
    return sig if any("#" in l for l in sig) else []


# autodoc gives a property without a docstring the docstring of the base class's attribute of that name, which
# for a class attribute holding a dict is `dict`'s own docstring: dropped.
_BUILTIN_DOCS = {inspect.cleandoc(t.__doc__) for t in (dict, list, tuple, set, frozenset, str, int, float, bool, object)}


def on_docstring(app, what: str, name: str, obj, options, lines: list[str]) -> None:
    "Markdown docstring -> reST, the module's nbdev `Docs:` URL dropped, the source signature appended."
    if "\n".join(lines).strip() in _BUILTIN_DOCS: lines[:] = []
    if what == "module": lines[:] = [l for l in lines if not l.startswith("Docs: http")]
    lines[:] = [md_to_rst(l) for l in lines]
    sig = source_signature(obj) if what in ("function", "method", "class") else []
    if sig:
        lines += ["", ".. code-block:: python", "   :caption: in the source, with the comment on each parameter", ""]
        lines += ["   " + l for l in sig] + [""]


write_generated_pages()


def setup(app):
    app.connect("source-read", on_source_read)
    app.connect("autodoc-process-docstring", on_docstring)
    return {"parallel_read_safe": True}
