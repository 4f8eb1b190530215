"""Put MathJax 3 into docs/_static/mathjax/ so the built site renders equations with no network (run by `make docs`).

The site must not load anything from a CDN, so MathJax is served from the site itself. It is not vendored in git
(about 7 MB of minified third-party code and fonts); instead `make docs` sets it up the way pip sets up Sphinx:
from its registry (npm), at an exact version, checked against the registry's sha512 integrity pinned below. The
tarball is kept in a cache folder (default `.venv/cache/`, git-ignored), so later builds are offline; with no
network at all, put `mathjax-<VERSION>.tgz` there by hand. Nothing here runs when the uad_study package runs.
"""
from __future__ import annotations
import argparse, base64, hashlib, shutil, subprocess, sys, tarfile
from pathlib import Path

VERSION = "3.2.2"  # the last MathJax 3 release; Sphinx's mathjax extension speaks MathJax 3
INTEGRITY = "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="  # `npm view mathjax@3.2.2 dist.integrity`
# What the page script `tex-mml-chtml.js` loads or may load lazily (paths under the package's es5/): the CHTML
# fonts, TeX extensions that \require or autoload pulls in, and the menu's accessibility options (sre: speech).
PARTS = ["tex-mml-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions", "input/mml/extensions",
         "a11y", "ui", "sre"]
DOCS = Path(__file__).resolve().parent


def integrity_of(path: Path) -> str:
    "npm's integrity string (sha512, base64) of a file."
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def fetch_tarball(cache: Path) -> Path:
    "The verified `mathjax-VERSION.tgz` in `cache`: taken from the cache, else fetched with `npm pack`."
    tgz = cache / f"mathjax-{VERSION}.tgz"
    if not tgz.is_file():
        npm = shutil.which("npm")
        if npm is None:
            sys.exit(f"fetch_mathjax: npm is not installed and {tgz} is missing; install Node.js/npm, or download "
                     f"https://registry.npmjs.org/mathjax/-/mathjax-{VERSION}.tgz into {cache}/")
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "pack", f"mathjax@{VERSION}", "--pack-destination", str(cache), "--silent"],
                       check=True, stdout=subprocess.DEVNULL)
    got = integrity_of(tgz)
    if got != INTEGRITY:
        tgz.unlink()
        sys.exit(f"fetch_mathjax: {tgz} does not match the pinned integrity {INTEGRITY} (got {got}); deleted it")
    return tgz


def install(tgz: Path, dest: Path) -> None:
    "Extract PARTS of the package's es5/ build from `tgz` into `dest`, then write `dest/VERSION`."
    if dest.exists(): shutil.rmtree(dest)
    prefixes = tuple(f"package/es5/{p}" for p in PARTS)
    with tarfile.open(tgz) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.startswith(prefixes)]
        for m in members:
            out = dest / m.name[len("package/es5/"):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tf.extractfile(m).read())
    if not (dest / "tex-mml-chtml.js").is_file(): sys.exit(f"fetch_mathjax: {tgz} has no es5/tex-mml-chtml.js")
    (dest / "VERSION").write_text(VERSION + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=DOCS.parent / ".venv" / "cache", help="where the tarball is kept")
    p.add_argument("--dest", type=Path, default=DOCS / "_static" / "mathjax", help="the folder the site serves")
    a = p.parse_args(argv)
    version_file = a.dest / "VERSION"
    if version_file.is_file() and version_file.read_text().strip() == VERSION: return  # already in place
    install(fetch_tarball(a.cache), a.dest)
    print(f"MathJax {VERSION} -> {a.dest}")


if __name__ == "__main__":
    main()
