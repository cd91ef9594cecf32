"""The differential suite's cases: name -> layers (uncompressed tars, bottom first).

Each layer is applied on its own into a fresh directory, as an overlay snapshotter applies
every layer into its own upper directory.
"""

from __future__ import annotations

from pathlib import Path

from fixtures import layers as L
from fixtures import rawtar as R

from tests.images.unpack.test_hostile_layers_are_refused import hostile_layers

MTIME_DIR, MTIME_FILE = L.MTIME, 1_600_000_000

#: A regular file header that, read as data by one reader, is an entry for the other.
HIDDEN = R.entry(b"hidden", b"surprise\n", mode=0o4755)


def ordinary() -> dict[str, list[bytes]]:
    """Layers as real images have them."""
    return {
        "files-and-dirs": [
            L.Layer()
            .dir("etc")
            .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
            .file("etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42)
            .dir("home/user", mode=0o700, uid=1000, gid=1000)
            .file("home/user/.profile", b"PATH=/bin\n", uid=1000, gid=1000)
            .file("empty")
            .tar()
        ],
        "implicit-parents": [L.Layer().file("a/b/c/d", b"deep").tar()],
        "odd-modes": [
            L.Layer()
            .file("setuid", b"#!", mode=0o4755)
            .file("setgid", b"#!", mode=0o2711, gid=50)
            .dir("sticky", mode=0o1777)
            .file("none", b"", mode=0)
            .dir("locked", mode=0o500)
            .file("locked-child-first/x", b"x")
            .dir("locked-child-first", mode=0o555)
            .tar()
        ],
        "symlinks": [
            L.Layer()
            .dir("usr/bin")
            .file("usr/bin/sh", b"sh", mode=0o755)
            .symlink("bin", "usr/bin")
            .symlink("abs", "/usr/bin/sh")
            .symlink("dangling", "nowhere")
            .symlink("up", "../../../../etc/passwd")
            .symlink("owned", "x", uid=7, gid=8)
            .file("bin/through-link", b"resolved inside the root")
            .tar()
        ],
        "hardlinks": [
            L.Layer()
            .file("a", b"shared")
            .hardlink("b", "a")
            .dir("d")
            .hardlink("d/c", "a")
            .hardlink("e", "./a")
            .tar()
        ],
        "devices-and-fifos": [
            L.Layer()
            .dir("dev")
            .char("dev/null", 1, 3)
            .char("dev/tty", 5, 0, mode=0o620, uid=0)
            .block("dev/sda", 8, 0)
            .fifo("run-fifo", mode=0o600)
            .tar()
        ],
        "xattrs": [
            L.Layer()
            .file("f", b"x", xattrs={"user.mime": b"text/plain", "user.bin": b"\x00\xff"})
            .dir("d", xattrs={"user.dir": b"1"})
            .file("ping", b"\x7fELF", mode=0o755, xattrs={
                "security.capability": bytes.fromhex("0100000200200000000000000000000000000000")
            })
            .tar()
        ],
        "whiteouts": [
            L.Layer().dir("etc").whiteout("etc/old.conf").whiteout("gone-dir").tar()
        ],
        "whiteout-owner": [
            L.Layer().add(L.Entry(b".wh.owned", uid=1000, gid=1000)).tar()
        ],
        "opaque-dirs": [
            L.Layer().dir("opt").opaque("opt").file("opt/new", b"n").opaque("var/lib").tar()
        ],
        "opaque-before-its-dir": [L.Layer().opaque("x").dir("x", mode=0o711).tar()],
        "aufs-metadata-skipped": [
            L.Layer().add(L.Entry(b".wh..wh.plnk/123.4", data=b"x")).file("f").tar()
        ],
        "replacements": [
            L.Layer()
            .file("x", b"first")
            .file("x", b"second")
            .dir("d")
            .file("d/f", b"in d")
            .file("d", b"file now")
            .symlink("s", "x")
            .dir("s")
            .dir("m", mode=0o700)
            .dir("m", mode=0o755, uid=5)
            .tar()
        ],
        "pax-long-names": [
            L.Layer()
            .file("n" * 120 + "/" + "f" * 150, b"long")
            .symlink("l", "t" * 200)
            .hardlink("h" * 130, "n" * 120 + "/" + "f" * 150)
            .tar()
        ],
        "gnu-long-names": [
            L.Layer(long_names="gnu")
            .file("n" * 120 + "/" + "f" * 150, b"long")
            .symlink("l", "t" * 200)
            .tar()
        ],
        "pax-fields": [
            R.pax({b"uid": b"70000", b"gid": b"70001", b"mtime": b"1600000000.5",
                   b"size": b"3"})
            + R.entry(b"paxed", b"abc", mode=0o600)
            + R.END
        ],
        "dot-slash-names": [
            L.Layer().dir("./etc").file("./etc/hosts", b"127.0.0.1 localhost\n").tar()
        ],
        "no-end-of-archive": [L.Layer().file("f", b"x").tar(end=False)],
        "pax-global-header-skipped": [
            R.pax({b"comment": b"built by hand"}, type=b"g") + R.entry(b"f", b"x") + R.END
        ],
        "base256-fields": [
            R.patch(L.header(b"big-uid", uid=1), 108, b"\x80" + (2_000_000).to_bytes(7, "big"))
            + R.END
        ],
        "directory-size-is-no-data": [
            R.entry(b"bin/sh", b"EVIL")
            + L.header(b"x", type=b"5", size=len(R.pad(b"benign")) + 512)
            + R.entry(b"bin/sh", b"benign")
            + R.END
        ],
        "hardlink-header-metadata": [
            L.Layer()
            .file("a", b"shared", mode=0o755, uid=3, gid=3)
            .add(L.Entry(b"b", L.HARDLINK, mode=0o4777, uid=5, gid=6, mtime=1, linkname=b"a"))
            .tar()
        ],
        "hardlink-to-itself": [L.Layer().file("a", b"x").hardlink("./a", "a").tar()],
        "hardlink-replaces-the-directory-holding-its-target": [
            L.Layer().file("a/a", b"x").dir("a").hardlink("a", "a/a").tar()
        ],
        "negative-pax-mtime": [
            L.Layer().add(L.Entry(b"a", pax={b"mtime": b"-86400.5"})).tar()
        ],
        "directory-replaced-by-a-dangling-symlink": [
            L.Layer().dir("a").symlink("a", "nowhere").tar()
        ],
        "directory-replaced-by-a-symlink-to-itself": [
            L.Layer().dir("a").symlink("a", "a").tar()
        ],
        "directory-replaced-by-a-file": [
            L.Layer().dir("d").file("d/x", b"x").file("d", b"f", mtime=MTIME_FILE).tar()
        ],
        "implicit-directory-replaced-by-a-file": [
            L.Layer().dir("a/a").file("a", b"f").tar()
        ],
        "directory-repeated-with-another-owner": [
            L.Layer().dir("d/a", uid=1000, gid=1000).dir("d/a", uid=0, gid=0).tar()
        ],
        "implicit-directory-under-a-setgid-directory": [
            L.Layer().dir("s", mode=0o2750).symlink("s/a/l", "a").tar()
        ],
        "whiteout-of-an-entry-of-the-same-layer": [
            L.Layer().dir("c/a/c").whiteout("c/a/c").tar()
        ],
        "whiteout-and-recreate-in-one-layer": [
            L.Layer().whiteout("d").dir("d").file("d/new", b"n").tar()
        ],
        "opaque-at-layer-root": [
            L.Layer().add(L.Entry(b".wh..wh..opq")).file("new", b"n").tar()
        ],
    }


def issue_15() -> dict[str, list[bytes]]:
    """Issue #15's "Differences found", items 1-11, as raw tar bytes."""
    size_1024 = b"\0" + b"0000002000" + b"\0"  # a leading NUL before the octal digits
    return {
        "1-leading-nul-in-size": [
            R.patch(L.header(b"a", size=0), 124, size_1024) + HIDDEN + R.END
        ],
        "2-whiteout-with-unknown-type-and-body": [
            L.header(b".wh.gone", type=b"Z", size=len(HIDDEN)) + HIDDEN + R.END
        ],
        "3-two-pax-headers-in-a-row": [
            R.pax({b"uid": b"1000", b"SCHILY.xattr.user.first": b"1"})
            + R.pax({b"path": b"second"})
            + R.entry(b"f", b"x")
            + R.END
        ],
        "4-pax-then-global-then-entry": [
            R.pax({b"path": b"renamed", b"uid": b"1000"})
            + R.pax({b"comment": b"g"}, type=b"g")
            + R.entry(b"f", b"x")
            + R.END
        ],
        "5-old-regular-type-with-slash-and-data": [
            L.header(b"d/", type=b"\0", size=len(HIDDEN), mode=0o750) + HIDDEN + R.END
        ],
        "6-pax-empty-path": [
            R.pax({b"path": b""})
            + L.header(b"f", type=b"5", mode=0o700, uid=1000, gid=1000)
            + R.END
        ],
        "7-size-with-sign": [
            R.patch(L.header(b"f"), 124, b"+0000000011\0") + R.pad(b"123456789") + R.END
        ],
        "7-size-with-underscore": [
            R.patch(L.header(b"f"), 124, b"0_000000011\0") + R.pad(b"123456789") + R.END
        ],
        "8-star-prefix": [R.star(L.header(b"name", size=1), b"p" * 131) + R.pad(b"x") + R.END],
        "8-gnu-non-numeric-atime": [
            R.gnu(R.patch(L.header(b"name", size=1), 345, b"prefix\0"))
            + R.pad(b"x")
            + R.END
        ],
        "9-dot-entry-with-mode-and-owner": [
            L.Layer().dir("./", mode=0o700, uid=1000, gid=1000).file("./f", b"x").tar()
        ],
        "10-hardlink-to-absolute-path": [
            L.Layer().dir("a").file("a/file", b"x").hardlink("h", "/a/file").tar()
        ],
        "11-gnu-sparse-old": [
            R.gnu_sparse(b"sparse", [(0, b"head"), (8192, b"middle")], 20000) + R.END
        ],
        "11-gnu-sparse-pax-0.1": [
            R.pax_sparse_01(b"sparse", [(0, b"head"), (10000, b"tail")], 10004) + R.END
        ],
        "11-gnu-sparse-pax-1.0": [
            R.pax_sparse(b"sparse", [(4096, b"data"), (16384, b"tail")], 16388) + R.END
        ],
    }


def hostile(canary: Path) -> dict[str, list[bytes]]:
    """``tests/images/unpack``'s hostile layers (against ``canary``, outside the root)."""
    return {f"hostile-{k}": v for k, v in hostile_layers(canary).items()}


def stacked() -> dict[str, list[bytes]]:
    """Images of several layers, where the lower layers matter: parent directories a layer
    creates implicitly, whiteouts and opaque directories over lower content, replacements
    of lower entries, and symlinks in lower layers."""
    base = (
        L.Layer()
        .dir("srv", mode=0o750, uid=7, gid=7, xattrs={"user.lower": b"1"})
        .file("srv/old", b"old")
        .dir("d")
        .file("d/x", b"x")
        .file("d/y", b"y")
        .file("a", b"a")
        .dir("usr/bin")
        .symlink("bin", "usr/bin")
        .tar()
    )
    return {
        "implicit-parents-take-lower-metadata": [
            base, L.Layer().file("srv/www/index.html", b"<html>").tar()
        ],
        "whiteouts-of-lower-entries": [base, L.Layer().whiteout("a").whiteout("d").tar()],
        "opaque-over-lower": [base, L.Layer().opaque("d").file("d/z", b"z").tar()],
        "directory-replaced-by-a-file": [base, L.Layer().file("d", b"now a file").tar()],
        "file-replaced-by-a-directory": [base, L.Layer().dir("a").file("a/in", b"i").tar()],
        "entry-below-a-lower-symlink": [base, L.Layer().file("bin/sh", b"sh").tar()],
        "three-layers": [
            base,
            L.Layer().file("d/x", b"x2").whiteout("srv/old").tar(),
            L.Layer().dir("srv", mode=0o700).opaque("d").file("d/w", b"w").tar(),
        ],
        "lower-file-replaced-by-a-directory-with-implicit-subdirectories": [
            base, L.Layer().dir("a").file("a/b/c", b"c").tar()
        ],
        "lower-symlink-loop-replaced-by-a-directory-with-implicit-subdirectories": [
            L.Layer().symlink("a", "a").tar(), L.Layer().dir("a").file("a/a/a", b"a").tar()
        ],
        "implicit-directories-in-a-lower-setgid-directory": [
            L.Layer().dir("d", mode=0o2750, uid=1000, gid=1000).tar(),
            L.Layer().file("d/a/b/f", b"f").tar(),
        ],
        "opaque-at-layer-root-over-lower": [
            base, L.Layer().add(L.Entry(b".wh..wh..opq")).file("new", b"n").tar()
        ],
        "whiteout-and-recreate-over-lower": [
            base, L.Layer().whiteout("d").dir("d").file("d/new", b"n").tar()
        ],
    }
