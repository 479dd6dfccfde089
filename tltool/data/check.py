"""`data check`: read every file of an image folder (and its validation/test folders) and report what is wrong.

Every image is fully decoded (as training would), hashed by content (SHA-256: exact duplicates, the same
file under two classes) and by appearance (a 64-bit perceptual hash, pHash: near-duplicates shared between
splits). The result is a plain dict (JSON-ready) with `problems` and `warnings`:

* a **problem** makes results wrong or training impossible: broken files, the same image under two classes,
  images shared between training and validation/test (leakage), fewer than two classes with images,
  validation/test classes the training folder lacks, a `group_by` group that spans classes. `ok` is False.
* a **warning** is worth a look but training works: empty class folders (left out), strong imbalance,
  classes with very few images, exact duplicates within a class, near-duplicates inside the training
  folder, files outside class folders or in formats tltool ignores, file names `group_by` does not match,
  class folders whose names differ only in letter case.

Odd-but-valid files (transparency, palette, grayscale, CMYK, 16-bit, EXIF rotation, animation, tiny or
huge, single-colour) are listed as notes: tltool reads them correctly.
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tltool.data.folders import bad_class_name, case_clashes, check_folder, class_folders, group_key
from tltool.data.images import UNSUPPORTED_EXTENSIONS, ImageReadError, decode, io_workers, is_image_name
from tltool.errors import DataError
from tltool.recipe import compile_group_by

#: pHash bits (of 64) two images may differ in and still count as near-duplicates. Re-encoded, resized or
#: brightened copies differ in 0-8 bits; unrelated pictures in about 32 (rarely under 16).
NEAR_DISTANCE = 8
#: imbalance (largest class / smallest class) from which a warning is given
IMBALANCE_WARNING = 10.0
#: classes with fewer readable images than this get a warning
FEW_IMAGES = 5
#: images whose shorter side is below this many pixels are noted as very small
SMALL_SIDE = 32
#: images with more pixels than this are noted as very large (slow to decode every epoch)
LARGE_PIXELS = 40_000_000
#: how many example files or pairs a report lists per finding
MAX_EXAMPLES = 10

_ROLES = ("train", "val", "test")
_NAMES = {"train": "training", "val": "validation", "test": "test"}
_HASH_SIZE = 8
_DCT_SIZE = 32


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


_DCT = _dct_matrix(_DCT_SIZE)


def perceptual_hash(rgb: np.ndarray) -> tuple[int, float]:
    """pHash of an RGB array (any size): 64 bits from the low-frequency DCT of a 32x32 grey version.

    Returns (hash, spread) where spread is the standard deviation of the grey thumbnail: near 0 for
    single-colour images, whose hash carries no information.
    """
    from PIL import Image

    grey = np.asarray(Image.fromarray(rgb).convert("L").resize((_DCT_SIZE, _DCT_SIZE), Image.BOX), np.float64)
    coeffs = _DCT @ grey @ _DCT.T
    low = coeffs[:_HASH_SIZE, :_HASH_SIZE].ravel()
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0]), float(grey.std())


def inspect_file(path: str | Path) -> dict:
    """Read and decode one file: SHA-256, pHash, what is odd about it, or why it is broken.

    Never raises for a bad file: the error is in the result (`error`, `kind`).
    """
    out: dict = {"path": str(path)}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        out.update(error=f"cannot read: {exc.strerror or exc}", kind="unreadable")
        return out
    out["bytes"] = len(data)
    out["sha256"] = hashlib.sha256(data).hexdigest()
    facts: dict = {}
    try:
        thumb = np.asarray(decode(data, size=64, facts=facts))
    except ImageReadError as exc:
        out.update(error=str(exc), kind=exc.kind)
        return out
    out["phash"], spread = perceptual_hash(thumb)
    # The same picture stored twice (a PNG re-save of a JPEG's pixels, another file name) has other bytes
    # but the same decoded pixels.
    out["pixels_sha256"] = hashlib.sha256(np.ascontiguousarray(thumb).tobytes()).hexdigest()
    out["odd"] = _oddities(facts, spread)
    out["width"], out["height"] = facts["width"], facts["height"]
    return out


def _oddities(facts: dict, spread: float) -> list[str]:
    mode = facts["mode"]
    odd = []
    if facts["transparency"]:
        odd.append("alpha")
    if mode in ("P", "PA"):
        odd.append("palette")
    if mode in ("1", "L", "LA", "La") or mode.startswith("I"):
        odd.append("grayscale")
    if mode.startswith("I;16") or mode == "I":
        odd.append("16-bit")
    if mode == "CMYK":
        odd.append("cmyk")
    if mode not in ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "I", "F") \
            and not mode.startswith("I;16"):
        odd.append(f"mode {mode}")
    if facts["orientation"] not in (0, 1):
        odd.append("exif-rotated")
    if facts["frames"] > 1:
        odd.append("animated")
    if min(facts["width"], facts["height"]) < SMALL_SIDE:
        odd.append("very small")
    if facts["width"] * facts["height"] > LARGE_PIXELS:
        odd.append("very large")
    if spread < 1.0:
        odd.append("single colour")
    return odd


# ---------------------------------------------------------------------------------------------- scanning


def _list_folder(root: Path) -> tuple[dict[str, list[Path]], dict]:
    """Image files per class folder, and what was ignored (hidden, non-image, unsupported, outside classes)."""
    per_class: dict[str, list[Path]] = {}
    ignored = {"hidden": 0, "non_image": 0, "unsupported": [], "outside_classes": []}
    for entry in sorted(root.iterdir()):
        if entry.is_file():
            if entry.name.startswith("."):
                ignored["hidden"] += 1
            elif is_image_name(entry) or entry.suffix.lower() in UNSUPPORTED_EXTENSIONS:
                ignored["outside_classes"].append(entry.name)
            else:
                ignored["non_image"] += 1
    for folder in class_folders(root):
        files = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith("."):
                    ignored["hidden"] += 1
                elif is_image_name(path):
                    files.append(path)
                elif path.suffix.lower() in UNSUPPORTED_EXTENSIONS:
                    ignored["unsupported"].append(path.relative_to(root).as_posix())
                else:
                    ignored["non_image"] += 1
        per_class[folder.name] = files
    for dirpath, dirnames, filenames in os.walk(root):  # hidden folders: count what they hold
        for d in [d for d in dirnames if d.startswith(".")]:
            ignored["hidden"] += sum(len(f) for _, _, f in os.walk(Path(dirpath) / d))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return per_class, ignored


def _read_all(jobs: list[Path], workers: int | None, progress: bool) -> list[dict]:
    """inspect_file over all jobs with a thread pool (Pillow, zlib and hashlib release the GIL)."""
    workers = workers or io_workers()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(inspect_file, jobs, chunksize=1)
        if not progress:
            return list(results)
        import click

        with click.progressbar(results, length=len(jobs), label="Reading images", file=sys.stderr,
                               show_pos=True) as bar:
            return list(bar)


# ---------------------------------------------------------------------------------------------- matching


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


def near_pairs(a: np.ndarray, b: np.ndarray | None, max_distance: int) -> list[tuple[int, int, int]]:
    """Index pairs (i, j, distance) of 64-bit hashes within `max_distance` bits; b=None: pairs i<j inside a."""
    same = b is None
    b = a if same else b
    out = []
    if len(a) == 0 or len(b) == 0:
        return out
    chunk = max(1, 4_000_000 // len(b))  # bounds the temporary XOR matrix to ~32 MB
    for start in range(0, len(a), chunk):
        block = a[start:start + chunk]
        dist = _popcount(block[:, None] ^ b[None, :])
        close = dist <= max_distance
        if same:
            close &= np.arange(start, start + len(block))[:, None] < np.arange(len(b))[None, :]
        for i, j in zip(*np.nonzero(close)):
            out.append((start + int(i), int(j), int(dist[i, j])))
    return out


# ---------------------------------------------------------------------------------------------- the check


def check_data(train, val=None, test=None, group_by: str | None = None, *, near_distance: int = NEAR_DISTANCE,
               workers: int | None = None, progress: bool = False) -> dict:
    """Read every image of a training folder (and optional validation/test folders) and report problems.

    Args:
        train: the training folder (one sub-folder per class).
        val, test: optional validation and test folders with the same class sub-folders.
        group_by: regex on file names, as the recipe's `data.group_by`: reports the groups and any group
            whose files span classes.
        near_distance: pHash bits two images may differ in and count as near-duplicates (default 8).
        workers: reading threads (default: CPU count + 4, at most 32).
        progress: show a progress bar on stderr.

    Returns:
        A JSON-ready dict: `ok` (True when the data can be trained on as is), `problems` and `warnings`
        (lists of {"code", "message"}), `folders` (per role: class counts, imbalance, broken, odd,
        duplicates, label conflicts, ignored files, groups) and `leakage` (near-duplicate pairs between splits).

    Raises:
        DataError: a folder does not exist, or `group_by` is not a valid regular expression.
    """
    roots = {role: Path(p).expanduser() for role, p in (("train", train), ("val", val), ("test", test))
             if p is not None}
    for role, root in roots.items():
        check_folder(root, _NAMES[role])
    if group_by is not None:
        try:
            compile_group_by(group_by)
        except ValueError as exc:
            raise DataError(f"--group-by {group_by!r} {exc}") from None
    listings, infos = _read_folders(roots, workers, progress)
    found = _Findings()
    folders = {}
    for role, root in roots.items():
        per_class, ignored = listings[role]
        folders[role] = _folder_report(root, per_class, ignored, [i for i in infos if i["role"] == role])
        what = f"{_NAMES[role]} folder {root}"
        _judge_files(found, what, root, folders[role], ignored)
        _judge_classes(found, role, what, folders[role], folders["train"])
    if group_by is not None:
        folders["train"]["groups"] = _judge_groups(found, infos, group_by)
    leakage = _judge_leakage(found, infos, near_distance)
    folders["train"]["near_duplicates"] = _judge_near_duplicates(found, infos, near_distance, group_by,
                                                                 has_val_folder="val" in roots)
    return {
        "ok": not found.problems,
        "problems": found.problems,
        "warnings": found.warnings,
        "folders": folders,
        "leakage": leakage,
        "settings": {"group_by": group_by, "near_distance": near_distance, "imbalance_warning": IMBALANCE_WARNING,
                     "few_images": FEW_IMAGES, "small_side": SMALL_SIDE, "large_pixels": LARGE_PIXELS},
    }


class _Findings:
    """The problems (the data cannot be trained on as is) and warnings of a check, in the order found."""

    def __init__(self):
        self.problems: list[dict] = []
        self.warnings: list[dict] = []

    def problem(self, code: str, message: str) -> None:
        self.problems.append({"code": code, "message": message})

    def warn(self, code: str, message: str) -> None:
        self.warnings.append({"code": code, "message": message})


def _read_folders(roots: dict, workers: int | None, progress: bool) -> tuple[dict, list[dict]]:
    """Each folder's listing, and the facts of every image file in them (tagged with role, class, path)."""
    listings = {role: _list_folder(root) for role, root in roots.items()}
    jobs = [(role, name, path) for role, (per_class, _) in listings.items()
            for name, files in per_class.items() for path in files]
    infos = _read_all([path for _, _, path in jobs], workers, progress)
    for (role, name, path), info in zip(jobs, infos):
        info["role"], info["class"] = role, name
        info["rel"] = path.relative_to(roots[role]).as_posix()
    return listings, infos


def _judge_files(found: _Findings, what: str, root: Path, rep: dict, ignored: dict) -> None:
    """Broken files, label conflicts, empty classes, duplicates and ignored files of one folder."""
    if rep["broken"]:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(_count(b["kind"] for b in rep["broken"]).items()))
        found.problem("broken_files", f"{len(rep['broken'])} broken file(s) in the {what} ({kinds}); "
                                      f"training skips them. Fix or remove them.")
    if rep["label_conflicts"]:
        first = rep["label_conflicts"][0]
        found.problem("label_conflict", f"{len(rep['label_conflicts'])} image(s) are filed under more than one "
                                        f"class in the {what}, e.g. {' = '.join(first['paths'])}. Keep each in one "
                                        f"class.")
    if rep["empty_classes"]:
        found.warn("empty_class", f"Class folder(s) with no readable images in the {what}: "
                                  f"{', '.join(rep['empty_classes'])}; they are left out.")
    if rep["duplicates"]:
        extra = sum(len(group) - 1 for group in rep["duplicates"])
        found.warn("duplicates", f"{extra} exact duplicate file(s) within a class in the {what}, e.g. "
                                 f"{' = '.join(rep['duplicates'][0])}.")
    if ignored["outside_classes"]:
        found.warn("outside_classes", f"{len(ignored['outside_classes'])} image(s) directly in {root} are not in "
                                      f"a class folder and are ignored, e.g. {ignored['outside_classes'][0]}.")
    if ignored["unsupported"]:
        found.warn("unsupported_files", f"{len(ignored['unsupported'])} file(s) in formats tltool does not read "
                                        f"are ignored in the {what}, e.g. {ignored['unsupported'][0]}; convert "
                                        f"them to JPEG or PNG.")
    clashes = case_clashes(rep["classes"])
    if clashes:
        found.warn("case_clash", f"Class folders that differ only in letter case in the {what}: "
                                 f"{'; '.join(', '.join(same) for same in clashes)}. They are separate classes here, "
                                 f"but probably one, and cannot coexist on macOS or Windows: merge them into one "
                                 f"folder.")
    for name in rep["classes"]:
        if bad_class_name(name):
            found.problem("bad_class_name", f"Class folder {name!r} in the {what} {bad_class_name(name)}; "
                                            f"rename it.")


def _judge_classes(found: _Findings, role: str, what: str, rep: dict, train_rep: dict) -> None:
    """The training folder's classes (how many, how small, how balanced); another folder's against them."""
    classes = [c for c, n in rep["classes"].items() if n > 0]
    if role == "train":
        if len(classes) < 2:
            found.problem("too_few_classes", f"The {what} has {len(classes)} class(es) with readable images; "
                                             f"at least 2 are needed.")
        small = [c for c in classes if rep["classes"][c] < FEW_IMAGES]
        if small:
            found.warn("few_images", f"Class(es) with fewer than {FEW_IMAGES} images: "
                                     + ", ".join(f"{c} ({rep['classes'][c]})" for c in small) + ".")
        if rep["imbalance_ratio"] and rep["imbalance_ratio"] >= IMBALANCE_WARNING:
            found.warn("imbalance", f"Classes are imbalanced {rep['imbalance_ratio']:.1f}:1 (largest/smallest); "
                                    f"consider train.class_weights=auto or more images of the small classes.")
        return
    train_classes = [c for c, n in train_rep["classes"].items() if n > 0]
    unknown = [c for c in classes if c not in train_classes]
    missing = [c for c in train_classes if c not in classes]
    if not classes:
        found.problem("no_images", f"The {what} has no readable images.")
    if unknown:
        found.problem("unknown_classes", f"The {what} has classes the training folder does not: "
                                         f"{', '.join(unknown)}.")
    if missing and classes:
        found.warn("missing_classes", f"The {what} has no images of: {', '.join(missing)}.")


def _judge_groups(found: _Findings, infos: list[dict], group_by: str) -> dict:
    groups = _group_report([i for i in infos if i["role"] == "train" and "error" not in i], group_by)
    for span in groups["spanning_classes"]:
        found.problem("group_spans_classes", f"Group `{span['group']}` (--group-by) has files in classes "
                                             f"{', '.join(span['classes'])}: a group must belong to one class.")
    if groups["unmatched"]:
        found.warn("group_unmatched", f"{groups['unmatched']} file name(s) do not match --group-by {group_by!r}; "
                                      f"each is its own group, e.g. {groups['unmatched_examples'][0]}.")
    return groups


def _judge_leakage(found: _Findings, infos: list[dict], near_distance: int) -> list[dict]:
    leakage = _leakage(infos, near_distance)
    for leak in leakage:
        a, b = leak["between"]
        ex = leak["examples"][0]
        found.problem("leakage", f"{leak['pairs']} image pair(s) appear in both the {_NAMES[a]} and the "
                                 f"{_NAMES[b]} data ({leak['exact']} identical, the rest near-duplicates), e.g. "
                                 f"{a}:{ex['a']} ~ {b}:{ex['b']} (distance {ex['distance']}).")
    return leakage


def _judge_near_duplicates(found: _Findings, infos: list[dict], near_distance: int, group_by: str | None,
                           has_val_folder: bool) -> dict:
    inner = _inner_near_duplicates([i for i in infos if i["role"] == "train"], near_distance, group_by)
    across = [pair for pair in inner["all"] if pair["classes"][0] != pair["classes"][1]]
    if across:
        ex = across[0]
        found.warn("near_duplicates_across_classes",
                   f"{len(across)} near-duplicate pair(s) are filed under different classes (e.g. {ex['a']} ~ "
                   f"{ex['b']}): if they show the same thing (a resized or re-saved copy), keep it in one class; "
                   f"the model is taught two answers for it.")
    if inner["pairs"]:
        ex = inner["examples"][0]
        hint = "" if has_val_folder else " the automatic validation split may put them on both sides;"
        found.warn("near_duplicates", f"{inner['pairs']} near-duplicate pair(s) inside the training folder "
                                      f"(e.g. {ex['a']} ~ {ex['b']});{hint} use --group-by to keep related shots "
                                      f"together.")
    inner["across_classes"] = {"pairs": len(across), "examples": across[:MAX_EXAMPLES]}
    del inner["all"]
    return inner


def _count(items) -> dict:
    out: dict = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _folder_report(root: Path, per_class: dict, ignored: dict, infos: list[dict]) -> dict:
    good = [i for i in infos if "error" not in i]
    counts = {name: 0 for name in per_class}
    for info in good:
        counts[info["class"]] += 1
    nonzero = [n for n in counts.values() if n]
    odd: dict[str, list[str]] = {}
    for info in good:
        for kind in info["odd"]:
            odd.setdefault(kind, []).append(info["rel"])
    by_sha: dict[str, list[dict]] = {}
    by_pixels: dict[str, list[dict]] = {}
    for info in good:
        by_sha.setdefault(info["sha256"], []).append(info)
        by_pixels.setdefault(info.get("pixels_sha256", info["sha256"]), []).append(info)
    duplicates = [[i["rel"] for i in same] for same in by_sha.values()
                  if len(same) > 1 and len({i["class"] for i in same}) == 1]
    # The same picture under two classes: identical files, or identical pixels in other files.
    conflicts = [{"classes": sorted({i["class"] for i in same}), "paths": [i["rel"] for i in same]}
                 for same in by_pixels.values() if len({i["class"] for i in same}) > 1]
    return {
        "path": str(root),
        "classes": counts,
        "num_classes": len(nonzero),
        "images": len(good),
        "imbalance_ratio": round(max(nonzero) / min(nonzero), 2) if nonzero else None,
        "empty_classes": [name for name, n in counts.items() if n == 0],
        "broken": [{"path": i["rel"], "kind": i["kind"], "reason": i["error"]} for i in infos if "error" in i],
        "odd": odd,
        "duplicates": duplicates,
        "label_conflicts": conflicts,
        "ignored": ignored,
    }


def _group_report(infos: list[dict], pattern: str) -> dict:
    classes_of: dict[str, set] = {}
    unmatched = []
    for info in infos:
        key = group_key(info["path"], pattern)
        if key == info["path"]:
            unmatched.append(info["rel"])
            key = info["rel"]
        classes_of.setdefault(key, set()).add(info["class"])
    spanning = [{"group": key, "classes": sorted(cls)} for key, cls in sorted(classes_of.items()) if len(cls) > 1]
    return {"pattern": pattern, "count": len(classes_of), "unmatched": len(unmatched),
            "unmatched_examples": unmatched[:MAX_EXAMPLES], "spanning_classes": spanning}


def _hashable(infos: list[dict]) -> list[dict]:
    """Images whose pHash means something: single-colour images all hash alike, so they match only exactly."""
    return [i for i in infos if "error" not in i and "single colour" not in i["odd"]]


def _leakage(infos: list[dict], near_distance: int) -> list[dict]:
    by_role = {role: [i for i in infos if i["role"] == role and "error" not in i] for role in _ROLES}
    out = []
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if not by_role[a] or not by_role[b]:
            continue
        found: dict[tuple[str, str], int] = {}
        shas = {}
        for info in by_role[b]:
            shas.setdefault(info["sha256"], []).append(info)
        for info in by_role[a]:
            for other in shas.get(info["sha256"], []):
                found[(info["rel"], other["rel"])] = 0
        exact = len(found)
        ha, hb = _hashable(by_role[a]), _hashable(by_role[b])
        for i, j, dist in near_pairs(_hashes(ha), _hashes(hb), near_distance):
            found.setdefault((ha[i]["rel"], hb[j]["rel"]), dist)
        if found:
            pairs = sorted(found.items(), key=lambda kv: (kv[1], kv[0]))
            out.append({"between": [a, b], "pairs": len(pairs), "exact": exact,
                        "examples": [{"a": pa, "b": pb, "distance": d} for (pa, pb), d in pairs[:MAX_EXAMPLES]]})
    return out


def _inner_near_duplicates(infos: list[dict], near_distance: int, group_by: str | None) -> dict:
    """Near-duplicate pairs inside one folder that are not exact copies and not kept together by group_by."""
    cands = _hashable(infos)
    pairs = []
    for i, j, dist in near_pairs(_hashes(cands), None, near_distance):
        a, b = cands[i], cands[j]
        if a["sha256"] == b["sha256"] or a.get("pixels_sha256") == b.get("pixels_sha256"):
            continue  # exact copies are reported as duplicates or label conflicts
        if group_by is not None and group_key(a["path"], group_by) == group_key(b["path"], group_by) \
                and group_key(a["path"], group_by) != a["path"]:
            continue
        pairs.append((dist, a["rel"], b["rel"], a.get("class"), b.get("class")))
    pairs.sort()
    found = [{"a": a, "b": b, "distance": d, "classes": [ca, cb]} for d, a, b, ca, cb in pairs]
    return {"pairs": len(pairs), "examples": [{k: v for k, v in pair.items() if k != "classes"}
                                              for pair in found[:MAX_EXAMPLES]], "all": found}


def _hashes(infos: list[dict]) -> np.ndarray:
    return np.array([i["phash"] for i in infos], dtype=np.uint64)


# ---------------------------------------------------------------------------------------------- text


def format_report(report: dict) -> str:
    """The report as text for a terminal: per folder counts and findings, then problems and warnings."""
    lines = []
    for role, rep in report["folders"].items():
        lines.append(f"{_NAMES[role].capitalize()} folder {rep['path']}: {rep['images']} readable images in "
                     f"{rep['num_classes']} classes" + (f", imbalance {rep['imbalance_ratio']:.1f}:1"
                                                        if rep["imbalance_ratio"] else "") + ".")
        width = max((len(c) for c in rep["classes"]), default=5)
        for name, n in rep["classes"].items():
            lines.append(f"  {name:<{width}}  {n:>6}" + ("  (no readable images: left out)" if n == 0 else ""))
        if rep["broken"]:
            lines.append(f"  Broken files ({len(rep['broken'])}):")
            lines.extend(f"    {b['path']}: {b['reason']}" for b in rep["broken"][:MAX_EXAMPLES])
            if len(rep["broken"]) > MAX_EXAMPLES:
                lines.append(f"    ... and {len(rep['broken']) - MAX_EXAMPLES} more (see --json)")
        if rep["odd"]:
            lines.append("  Odd but readable (tltool handles these): " + ", ".join(
                f"{kind} {len(paths)}" for kind, paths in sorted(rep["odd"].items())) + ".")
        ign = rep["ignored"]
        if ign["hidden"] or ign["non_image"]:
            lines.append(f"  Ignored: {ign['hidden']} hidden file(s), {ign['non_image']} non-image file(s).")
        if "groups" in rep:
            g = rep["groups"]
            lines.append(f"  Groups (--group-by {g['pattern']!r}): {g['count']}, {g['unmatched']} file(s) unmatched.")
    for leak in report["leakage"]:
        a, b = leak["between"]
        lines.append(f"Shared between {_NAMES[a]} and {_NAMES[b]}: {leak['pairs']} pair(s) ({leak['exact']} identical):")
        lines.extend(f"  {a}:{ex['a']}  ~  {b}:{ex['b']}  (distance {ex['distance']})" for ex in leak["examples"])
    lines.append("")
    for item in report["problems"]:
        lines.append(f"PROBLEM: {item['message']}")
    for item in report["warnings"]:
        lines.append(f"Warning: {item['message']}")
    if report["ok"]:
        lines.append("OK: the data can be trained on" + (" (see the warnings above)." if report["warnings"] else "."))
    else:
        lines.append(f"{len(report['problems'])} problem(s) found: fix them before training.")
    return "\n".join(lines)
