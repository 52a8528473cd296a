"""Fields of view with label masks: one crop per labelled object, then the usual filters, canvas and views.

A field of view is an image holding many cells; its *label image* (mask) gives every pixel the
integer id of the object it belongs to (0 = background), as Cellpose and StarDist write them.

Fields are found like single cells (:func:`tprobe.data.dataset.discover`): ``FOV/donor_N/{activated,
quiescent}/NAME.tif``, Wang-style names, or a CSV/Parquet table with ``image,mask,label[,donor]``
columns (paths relative to the table). The label and donor of a field are those of every cell in it.

Pairing rule: the mask of ``NAME.tif`` (``NAME.ome.tif``) is, in the masks folder at the same
relative path, the one file among ``NAME_cp_masks.{png,tif,tiff}``, ``NAME_masks.{png,tif,tiff,npy}``
and (only when the masks folder is not the fields folder) ``NAME.{png,tif,tiff}``. A field with
none, or with two, is an error naming the file. A ``.npy`` mask is read with
``np.load(allow_pickle=False)``: a plain integer array is fine, but a Cellpose ``_seg.npy`` is a
pickled dict, which tprobe never loads (unpickling can run code); save its ``masks`` as a label
TIFF/PNG instead.

Each object is cut to its bounding box plus ``margin`` px (zeros beyond the field's edge, so every
crop is the box plus the margin on each side) and its pixels outside the object are zeroed
(``outside="zero"``) or kept (``"keep"``). Objects touching the field's border
(``touches_border``), smaller than ``min_object_area`` (``small_object``) or larger than
``max_object_area`` (``large_object``) are dropped with that reason; every crop is written, in the
field's own pixel type, as a TIFF under ``crops/`` and then preprocessed like a single cell.

A cell's id (``source_id``) is its field's content hash plus its label (``<field_id>_<object>``);
each row keeps ``field``, ``mask``, ``object``, ``area``, ``centroid_y/x`` and the object's
bounding box ``bbox_y0, bbox_x0, bbox_y1, bbox_x1`` (half-open, field pixels), so a prediction can
be drawn back onto its field. ``crop_id`` is the crop file's own hash (checked when reopened).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from tprobe.data import dataset as ds_mod
from tprobe.data import images
from tprobe.data.dataset import Dataset, Skipped
from tprobe.errors import ChannelError, TprobeError
from tprobe.models.random_weights import SHORT_NOTE

__all__ = ["discover_fields", "mask_for", "read_mask", "crop_fields", "preprocess_fields", "MASK_SUFFIXES"]

MASK_SUFFIXES = (
    "_cp_masks.png",
    "_cp_masks.tif",
    "_cp_masks.tiff",
    "_masks.png",
    "_masks.tif",
    "_masks.tiff",
    "_masks.npy",
)
LABEL_SUFFIXES = (".png", ".tif", ".tiff")  # NAME.<suffix> in a separate masks folder
CROP_NAME = re.compile(r"^[0-9a-f]{16}_\d+\.tif$")  # <field hash>_<label>.tif, what crop_fields writes


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", *LABEL_SUFFIXES, ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_mask_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(MASK_SUFFIXES) or name.endswith("_seg.npy")


def mask_for(field: Path, fov_root: Path, masks: Path) -> Path:
    """The label image of ``field`` under ``masks`` (same relative folder), by the pairing rule."""
    try:
        rel = field.parent.relative_to(fov_root)
    except ValueError:
        rel = Path()
    folder, name = masks / rel, _stem(field)
    names = [name + s for s in MASK_SUFFIXES]
    if masks.resolve() != fov_root.resolve():
        names += [name + s for s in LABEL_SUFFIXES]
    found = [folder / n for n in names if (folder / n).exists()]
    if not found:
        seg = folder / f"{name}_seg.npy"
        if seg.exists():
            return seg  # refused in one line by read_mask, with the way to a label image
        raise TprobeError(
            f"{field}: no mask found (looked for {name}_masks.tif/.png, {name}_cp_masks.png"
            f"{', ' + name + '.tif/.png' if len(names) > len(MASK_SUFFIXES) else ''} in {folder}); "
            "add its label image or remove the field"
        )
    if len(found) > 1:
        raise TprobeError(
            f"{field}: two masks fit it ({found[0].name} and {found[1].name} in {folder}); keep one"
        )
    return found[0]


def discover_fields(fov: str | Path, masks: str | Path | None = None, *, labelled: bool = True) -> Dataset:
    """The fields under ``fov`` (folder or table) with a ``mask`` column; ``masks`` defaults to ``fov``.

    ``labelled=False`` (prediction) takes every image under ``fov`` (label -1 where unknown).
    """
    fov = Path(fov)
    if not fov.exists():
        raise TprobeError(f"{fov}: no such file or folder; pass --fov with your fields of view")
    if fov.is_file() and fov.suffix.lower() in (".csv", ".parquet", ".pq"):
        return _fields_table(fov)
    masks = Path(masks) if masks is not None else (fov if fov.is_dir() else fov.parent)
    if not masks.is_dir():
        raise TprobeError(f"--masks {masks}: no such folder; pass the folder of label images")
    found = ds_mod.discover(fov) if labelled else ds_mod.discover_unlabelled(fov)
    fov = fov if fov.is_dir() else fov.parent
    table = found.table[[not _is_mask_name(Path(p)) for p in found.table["path"]]].reset_index(drop=True)
    skipped = [s for s in found.skipped if not _is_mask_name(Path(s.path))]
    if table.empty:
        raise TprobeError(f"{fov}: holds no fields of view (only masks); expected donor_N/<class>/NAME.tif")
    table = table.assign(mask=[str(mask_for(Path(p), fov, masks)) for p in table["path"]])
    return Dataset(fov, table, skipped, "fields")


def _fields_table(path: Path) -> Dataset:
    if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise TprobeError(
            f"{path}: expected a folder of fields, or a .csv/.parquet table with image,mask,label"
        )
    try:
        df = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise TprobeError(
            f"{path}: cannot be read as a table ({type(exc).__name__}); save it as CSV with "
            "columns image,mask,label[,donor]"
        ) from None
    df = df.rename(columns={"image": "path"}) if "image" in df.columns else df
    missing = {"path", "mask", "label"} - set(df.columns)
    if missing:
        raise TprobeError(
            f"{path}: lacks column(s) {sorted(c.replace('path', 'image') for c in missing)}; "
            "it needs image,mask,label[,donor]"
        )
    ds_mod.check_donors(path, df)
    rows, skipped, seen = [], [], {}
    for i, rec in enumerate(df.to_dict("records")):
        field, mask = (Path(str(rec[c])) for c in ("path", "mask"))
        field, mask = (p if p.is_absolute() else path.parent / p for p in (field, mask))
        ds_mod.listed_once(path, seen, i, field, rec["path"], "field")
        if str(rec["mask"]).strip() in ("", "nan") or not mask.exists():
            raise TprobeError(
                f"{path}: {ds_mod.table_rows(path, i)}: mask {rec['mask']} of {field} is missing; "
                "add the label image or remove the row"
            )
        label = ds_mod.LABEL_NAMES.get(str(rec["label"]).strip().removesuffix(".0").lower())
        if label is None:
            skipped.append(
                Skipped(
                    str(field),
                    f"label '{rec['label']}' is not one of activated/quiescent/1/0; fix the table row",
                )
            )
            continue
        rows.append(
            {
                **rec,
                "path": str(field),
                "mask": str(mask),
                "label": label,
                "donor": str(rec.get("donor", "donor_unknown")).strip(),
            }
        )
    if not rows:
        raise TprobeError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return Dataset(path, ds_mod._frame(rows), skipped, "fields-table")


def read_mask(
    path: str | Path, shape: tuple[int, int] | None = None, *, max_pixels: int | None = None
) -> np.ndarray:
    """A label image as a 2-D integer array (0 = background; its own unsigned type, else int64); never unpickles.

    A float mask, a negative label, a pickled ``.npy`` (a Cellpose ``_seg.npy``), a mask of
    another shape than its field (``shape``) and a binary (0/1, 0/255) mask of several separate
    pieces are errors naming the file and the fix.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        images.check_regular(path)
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError:
            raise TprobeError(
                f"{path}: a pickled .npy (a Cellpose _seg.npy is a pickled dict), which tprobe never "
                "loads; save its masks as a label image, e.g. tifffile.imwrite('NAME_masks.tif', "
                "seg['masks']) or cellpose --save_tif"
            ) from None
        except OSError as exc:
            raise TprobeError(
                f"{path}: cannot be read as a .npy array ({type(exc).__name__}); replace it"
            ) from None
    else:
        arr = images._read_raw(path, max_pixels, palette=False)  # a palette mask's indices are its labels
    arr = np.squeeze(arr) if arr.ndim > 2 else arr
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        raise TprobeError(
            f"{path}: a float mask ({arr.dtype}); a label image holds whole-number object ids: save "
            "it as an integer (uint16/uint32) TIFF or PNG"
        )
    if arr.dtype.kind not in "ui" or arr.ndim != 2:
        raise TprobeError(
            f"{path}: expected a 2-D integer label image, got {arr.dtype} of shape {arr.shape}; save "
            "one label plane per field"
        )
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise TprobeError(
            f"{path}: negative labels ({int(arr.min())}); objects are numbered 1, 2, ... and 0 is "
            "the background"
        )
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise TprobeError(
            f"{path}: mask is {arr.shape[0]}x{arr.shape[1]} px but its field is {shape[0]}x{shape[1]} "
            "px; give each field the label image made from it"
        )
    _refuse_binary(path, arr)
    return (
        arr if arr.dtype.kind == "u" and arr.dtype.itemsize <= 4 else arr.astype(np.int64)
    )  # no copy for uint


def _refuse_binary(path: Path, arr: np.ndarray) -> None:
    """A 0/1 or 0/255 segmentation mask (one value on every object pixel, in separate pieces) is one line.

    Read as a label image it is one object spanning all its cells, cut to one crop of the whole field
    and dropped (multi_cell, touches_border) without a word. One piece is a label image of one cell.
    """
    from scipy import ndimage

    top = arr.max() if arr.size else 0
    if not top or arr[arr != 0].min() != top:
        return
    n = ndimage.label(arr != 0, structure=np.ones((3, 3), bool))[1]
    if n > 1:
        raise TprobeError(
            f"{path}: a binary mask (every object pixel is {int(top)}, in {n} separate pieces), read as "
            "one object spanning all cells; give a label image, one integer per cell, e.g. "
            "skimage.measure.label(mask > 0)"
        )


def _sequential(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, seq)``: a label image whose largest id exceeds its pixel count (ids near 4e9 in a uint32
    mask) renumbered 1..n in id order (``seq``), with ``ids[k]`` the own id of object ``k`` (``ids[0]``
    is 0). Any other mask is returned as it is, with ``ids`` the identity."""
    top = int(mask.max()) if mask.size else 0
    if top <= mask.size:
        return np.arange(top + 1), mask
    ids, seq = np.unique(mask, return_inverse=True)
    seq = seq.reshape(mask.shape)
    if ids[0] != 0:  # no background pixel: 0 stays the background's number
        ids, seq = np.concatenate([[0], ids]), seq + 1
    return ids, seq


def _field_pixels(path: Path, config) -> np.ndarray:
    """A field's raw pixels (no scaling): (H, W) for grey input, (C, H, W) in ``config.channels`` order."""
    if not config.channels:
        return images._to_grey(images._read_raw(path, config.max_pixels, config.z, config.t), path)
    arr, axes = images._read_stack(path, config.max_pixels, config.z, config.t)
    stack = images._channels_first(arr, axes, len(config.channels), path, config.channels)
    return stack[0] if len(config.channels) == 1 else stack


def _window(arr: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """``arr[..., y0:y1, x0:x1]`` with zeros where the window leaves the array."""
    h, w = arr.shape[-2:]
    out = np.zeros((*arr.shape[:-2], y1 - y0, x1 - x0), dtype=arr.dtype)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    out[..., sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[..., sy0:sy1, sx0:sx1]
    return out


def crop_fields(fields: Dataset, config, crops: str | Path, *, progress: bool = False):
    """Cut every field's objects into TIFF crops under ``crops``.

    Returns the crops as a :class:`Dataset` (one row per kept object, ready for
    :func:`tprobe.data.preprocess.preprocess`), the manifest rows of the dropped objects, and warnings
    (a label image with no objects).
    """
    from scipy import ndimage
    from tqdm.auto import tqdm

    from tprobe.data.preprocess import _ome_columns

    if config.channel_files:
        raise TprobeError(
            "--channel-files does not apply to fields of view; save each field as one TIFF stack"
        )
    crops = Path(crops)
    if crops.exists():  # our own folder: crops of an earlier run with other options must not linger
        other = [p for p in crops.iterdir() if not CROP_NAME.match(p.name)] if crops.is_dir() else [crops]
        if other:
            raise TprobeError(
                f"{crops}: holds {other[0].name}, which tprobe did not write; choose another --out "
                "(tprobe empties OUT/crops before writing crops)"
            )
        shutil.rmtree(crops)
    crops.mkdir(parents=True)
    rows, dropped, warnings, seen = [], [], [], {}
    records = fields.table.to_dict("records")
    for rec in tqdm(records, desc="crop", unit="field", disable=None if progress else True):
        field, mask_path = Path(rec["path"]), Path(rec["mask"])
        try:
            pixels = _field_pixels(field, config)
            extra = _ome_columns(str(field), config)
        except ChannelError:
            raise
        except (OSError, TprobeError) as exc:
            fields.skipped.append(Skipped(str(field), str(exc) if isinstance(exc, TprobeError) else f"{exc}"))
            continue
        mask = read_mask(mask_path, pixels.shape[-2:], max_pixels=config.max_pixels)
        images.check_regular(field)
        field_id = hashlib.sha256(field.read_bytes()).hexdigest()[:16]
        if field_id in seen:  # its cells' ids (field hash + label) are taken: one crop file, counted twice
            fields.skipped.append(
                Skipped(str(field), f"same content as {seen[field_id]}; delete the duplicate")
            )
            continue
        seen[field_id] = field
        base = {k: v for k, v in rec.items() if k not in ("path", "mask")}
        base.update(extra, field=str(field), mask=str(mask_path), field_id=field_id)
        ids, mask = _sequential(mask)  # objects 1..n: per-id work never scales with the largest id
        boxes = ndimage.find_objects(mask)
        if not any(b is not None for b in boxes):
            warnings.append(f"{mask_path}: label image has no objects; field {field.name} gives no cells")
            continue
        labels = [i + 1 for i, b in enumerate(boxes) if b is not None]
        areas = np.bincount(mask.ravel(), minlength=len(boxes) + 1)
        centres = ndimage.center_of_mass(np.ones_like(mask), mask, labels)
        h, w = mask.shape
        for lab, (cy, cx) in zip(labels, centres, strict=True):
            ys, xs = boxes[lab - 1]
            y0, y1, x0, x1 = ys.start, ys.stop, xs.start, xs.stop
            cell_id = f"{field_id}_{ids[lab]}"  # the label image's own id
            row = {
                **base,
                "object": int(ids[lab]),
                "area": int(areas[lab]),
                "centroid_y": float(cy),
                "centroid_x": float(cx),
                "bbox_y0": y0,
                "bbox_x0": x0,
                "bbox_y1": y1,
                "bbox_x1": x1,
                "cell_id": cell_id,
            }
            reason = (
                "touches_border"
                if y0 == 0 or x0 == 0 or y1 == h or x1 == w
                else "small_object"
                if areas[lab] < config.min_object_area
                else "large_object"
                if config.max_object_area and areas[lab] > config.max_object_area
                else None
            )
            if reason:
                dropped.append(
                    {
                        **row,
                        "path": str(field),
                        "source_id": cell_id,
                        "group": cell_id,
                        "image_id": f"{cell_id}_orig",
                        "view": "orig",
                        "crop_id": "",
                        "kept": False,
                        "drop_reason": reason,
                    }
                )
                continue
            m = config.margin
            crop = _window(pixels, y0 - m, y1 + m, x0 - m, x1 + m)
            if config.outside == "zero":
                crop = crop * (_window(mask, y0 - m, y1 + m, x0 - m, x1 + m) == lab).astype(crop.dtype)
            out = crops / f"{cell_id}.tif"
            if crop.ndim == 3:
                tifffile.imwrite(out, crop, photometric="minisblack", metadata={"axes": "CYX"})
            else:
                tifffile.imwrite(out, crop, photometric="minisblack")
            rows.append({**row, "path": str(out)})
    table = ds_mod._frame(rows) if rows else pd.DataFrame(columns=ds_mod.COLUMNS)
    return Dataset(fields.root, table, list(fields.skipped), "crops"), dropped, warnings


def preprocess_fields(fov, masks, config, crops, *, progress: bool = False):
    """Fields + masks -> crops under ``crops`` -> :func:`tprobe.data.preprocess.preprocess`, dropped objects kept as rows.

    Returns the :class:`~tprobe.data.preprocess.Preprocessed` (its config has ``fov=True``; OME-TIFF
    channel names fill ``channels`` when none were given) and the warning lines.
    """
    from tprobe.data.preprocess import Preprocessed, _fingerprint, ome_defaults, preprocess

    fields = discover_fields(fov, masks)
    config = replace(ome_defaults(fields, config), fov=True)
    found, dropped, warnings = crop_fields(fields, config, crops, progress=progress)
    pre = preprocess(found, config, progress=progress)
    manifest = (
        pd.concat([pre.manifest, pd.DataFrame(dropped)], ignore_index=True) if dropped else pre.manifest
    )
    if manifest.empty:
        raise TprobeError(f"{fov}: no objects found in any field ({len(warnings)} empty label image(s))")
    if "crop_id" in manifest.columns:
        manifest["crop_id"] = manifest["crop_id"].fillna("").astype(str)
    return Preprocessed(manifest, config, _fingerprint(manifest), pre.skipped), [*warnings, *pre.warnings]


def draw_overlay(
    field: str | Path,
    mask: str | Path,
    p_by_object: dict,
    config,
    out: str | Path,
    *,
    random_weights: bool = False,
) -> Path:
    """The field (the channel the filters measure) with each object's outline coloured by P(activated)
    (viridis: purple 0 .. yellow 1); objects not scored (dropped) are outlined in red. Written as a PNG to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from tprobe.data.preprocess import read_cell

    img = read_cell(field, config)[0]
    ids, labels = _sequential(read_mask(mask, img.shape, max_pixels=config.max_pixels))
    p = np.full(len(ids), np.nan)
    for obj, value in p_by_object.items():
        k = int(np.searchsorted(ids, int(obj)))  # ids are sorted
        if k < len(ids) and ids[k] == int(obj):
            p[k] = value
    edge = find_boundaries(labels, mode="inner")
    cmap = plt.get_cmap("viridis")  # no red and no grey in it: red marks the objects not scored
    rgba = np.zeros((*labels.shape, 4))
    scores = p[labels[edge]]
    rgba[edge] = np.where(np.isnan(scores)[:, None], (1.0, 0.0, 0.0, 1.0), cmap(np.nan_to_num(scores)))
    h, w = img.shape
    fig, ax = plt.subplots(figsize=(min(12, max(4, w / 60)), min(12, max(3, h / 60)) + 0.6))
    ax.imshow(img, cmap="gray", vmin=0, vmax=max(1.0, float(img.max())), interpolation="nearest")
    ax.imshow(rgba, interpolation="nearest")
    ax.axis("off")
    fig.colorbar(
        plt.cm.ScalarMappable(norm=plt.Normalize(0, 1), cmap=cmap),
        ax=ax,
        fraction=0.04,
        label="P(activated); red: not scored",
    )
    note = f"\n{SHORT_NOTE}" if random_weights else ""
    ax.set_title(
        f"{Path(field).name}: {int(np.isfinite(p).sum())} of {len(p_by_object)} objects scored{note}",
        fontsize=8,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
