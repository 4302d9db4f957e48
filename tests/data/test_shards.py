"""Tar shards: `ummae shards` writes WebDataset-format shards, `TarShards` reads them by index with
the same samples as the folder they came from, damaged members and shards are skipped and named,
and every spelling of `--data` (brace pattern, directory, list file) finds the same shards."""

from __future__ import annotations

import io
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import run_cli_captured
from ummae.data import ImageFolderUnlabeled, TarShards, build_pretrain_dataset, pretrain_transform
from ummae.data.sampling import EpochSampler, SeededSamples
from ummae.data.shards import find_shards, image_field, is_shard_spec
from ummae.errors import UmmaeError

N_IMAGES = 7


def _write_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "cls_b").mkdir(parents=True)
    for i in range(N_IMAGES):
        sub = root / "cls_b" if i % 2 else root
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(sub / f"im{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    result = run_cli_captured(["shards", "--data", str(folder), "--out", str(out), "--shard-size", "3",
                               "--no-progress"], out)
    assert result.code == 0, result.err
    assert f"--data '{out}/train-{{000000..000002}}.tar'" in result.out
    return out


def test_shards_progress_writes_no_carriage_returns_into_a_log(folder, tmp_path):
    out = tmp_path / "s"
    result = run_cli_captured(["shards", "--data", str(folder), "--out", str(out)], out)  # progress on, no terminal
    assert result.code == 0, result.err
    assert "\r" not in result.err + result.out


def test_shards_hold_every_image_unchanged_and_webdataset_reads_them(folder, shards):
    import webdataset as wds

    files = sorted(p for p in folder.rglob("*.png"))
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"train-{k:06d}.tar" for k in range(3)]
    samples = list(wds.WebDataset(str(shards / "train-{000000..000002}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(N_IMAGES)]
    assert [s["png"] for s in samples] == [p.read_bytes() for p in files]  # bytes unchanged


def test_a_shard_sample_is_the_folder_sample_of_the_same_image(folder, shards):
    # Same images in the same order: the same seeded crops, so training on either is the same run.
    transform = pretrain_transform(32)
    from_folder = SeededSamples(ImageFolderUnlabeled(folder, transform), seed=3)
    from_shards = SeededSamples(TarShards(shards, transform), seed=3)
    assert len(from_shards) == len(from_folder) == N_IMAGES
    for i in range(N_IMAGES):
        assert torch.equal(from_folder[(1, i)]["image"], from_shards[(1, i)]["image"]), i
    assert not torch.equal(from_shards[(1, 0)]["image"], from_shards[(2, 0)]["image"])  # crops do vary


def test_every_spelling_of_the_shard_list_finds_the_same_shards(shards, tmp_path):
    expected = [str(shards / f"train-{k:06d}.tar") for k in range(3)]
    assert find_shards(shards / "train-{000000..000002}.tar") == expected
    assert find_shards(shards) == expected
    copy = tmp_path / "copy"
    copy.mkdir()
    for k in range(3):
        (copy / f"train-{k:06d}.tar").write_bytes((shards / f"train-{k:06d}.tar").read_bytes())
    listing = tmp_path / "list.txt"
    # relative to the list file, with a comment, a blank line and a brace pattern
    listing.write_text("# shards\ncopy/train-000000.tar\n\ncopy/train-{000001..000002}.tar\n")
    assert find_shards(listing) == [str(copy / f"train-{k:06d}.tar") for k in range(3)]
    for spec in (shards, listing, shards / "train-000001.tar", "x/train-{0..3}.tar"):
        assert is_shard_spec(spec)
    assert not is_shard_spec(shards.parent)  # a folder without .tar files at its top: images


def test_bad_shard_lists_are_one_line_errors(shards, tmp_path):
    with pytest.raises(UmmaeError, match="1 of 4 shards do not exist"):
        find_shards(shards / "train-{000000..000003}.tar")
    listing = tmp_path / "urls.txt"
    listing.write_text("s3://bucket/train-000000.tar\n")  # a scheme WebDataset's gopen has no handler for
    with pytest.raises(UmmaeError, match="cannot fetch shard 's3://bucket/train-000000.tar'.*no gopen handler"):
        find_shards(listing)
    with pytest.raises(UmmaeError, match="cannot fetch shard 'pipe:exit 3'"):
        find_shards("pipe:exit 3")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.tar").write_bytes(b"")
    with pytest.warns(UserWarning, match="damaged"), pytest.raises(UmmaeError, match="no images"):
        TarShards(tmp_path / "empty")


def test_labels_and_other_members_are_ignored(tmp_path):
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        for name, data in [("k1.jpg", _jpeg()), ("k1.cls", b"3"), ("k1.json", b"{}"),
                           ("k1.seg.png", _jpeg()), ("sub/k2.JPEG", _jpeg()), ("._k3.jpg", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = TarShards(tmp_path / "mixed.tar")
    assert [p.rsplit("/", 1)[-1] for p in ds.paths] == ["k1.jpg", "k2.JPEG"]
    assert ds[1].size == (24, 16)
    assert image_field("a.b/k.webp") == "webp" and image_field("k.seg.png") is None


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_corrupt_members_and_a_truncated_shard_are_skipped_and_named(shards, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    # shard 0: member 1 overwritten with garbage; shard 2: cut in the middle of its last member
    raw0 = bytearray((shards / "train-000000.tar").read_bytes())
    with tarfile.open(shards / "train-000000.tar") as tar:
        victim = tar.getmembers()[1]
    raw0[victim.offset_data: victim.offset_data + 64] = b"\0" * 64
    (damaged / "train-000000.tar").write_bytes(bytes(raw0))
    (damaged / "train-000001.tar").write_bytes((shards / "train-000001.tar").read_bytes())
    raw2 = (shards / "train-000002.tar").read_bytes()
    with tarfile.open(shards / "train-000002.tar") as tar:
        last = tar.getmembers()[-1]
    (damaged / "train-000002.tar").write_bytes(raw2[: last.offset_data + last.size // 2])

    with pytest.warns(UserWarning, match="train-000002.tar' is damaged: unreadable after 1 images"):
        ds = TarShards(damaged, transform=None)
    assert len(ds) == N_IMAGES  # a member cut short is indexed, and fails when read
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        images = [ds.load(i) for i in range(N_IMAGES)]
    bad = {f"{damaged / 'train-000000.tar'}/{victim.name}", f"{damaged / 'train-000002.tar'}/{last.name}"}
    assert {p for _, skipped in images for p in skipped} == bad == ds.skipped
    assert all(isinstance(img, Image.Image) for img, _ in images)
    # the other five decode to the very images of the intact shards
    intact = TarShards(shards, transform=None)
    for i in range(N_IMAGES):
        if ds.paths[i] not in bad:
            assert np.array_equal(np.asarray(ds[i]), np.asarray(intact[i]))


def test_ranks_and_workers_see_every_shard_image_once_per_epoch(shards):
    # The sampler is the folder's: ranks x DataLoader workers split indices, not shards.
    ds = SeededSamples(TarShards(shards, pretrain_transform(16)), seed=0)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            sampler = EpochSampler(len(ds), seed=0, world_size=2, rank=rank)
            sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=sampler, num_workers=2)
            seen += [int(b["index"]) for b in loader]
        assert len(seen) == len(set(seen)) == N_IMAGES - N_IMAGES % 2  # the odd one out of a round


def test_ummae_shards_lists_unreadable_files_and_refuses_to_overwrite(folder, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(folder.rglob("*.png"))[:2]:
        (data / p.name).write_bytes(p.read_bytes())
    (data / "broken.jpg").write_text("not an image")
    out = tmp_path / "out"
    result = run_cli_captured(["shards", "--data", str(data), "--out", str(out), "--no-progress"], out)
    assert result.code == 0, result.err
    assert "1 unreadable image(s)" in result.out
    assert "broken.jpg" in (out / "skipped_images.txt").read_text()
    assert len(TarShards(out)) == 2
    again = run_cli_captured(["shards", "--data", str(data), "--out", str(out)], out)
    assert again.code == 2 and "already holds" in again.err and "Traceback" not in again.err


def test_a_missing_webdataset_is_a_one_line_error(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # import fails as if not installed
    result = run_cli_captured(["shards", "--data", str(folder), "--out", str(tmp_path / "o")], tmp_path)
    assert result.code == 2 and "pip install 'ummae[shards]'" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_build_pretrain_dataset_picks_shards_or_folder(folder, shards):
    assert type(build_pretrain_dataset(str(shards), 32)) is TarShards
    assert type(build_pretrain_dataset(str(folder), 32)) is ImageFolderUnlabeled


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_the_header_index_agrees_with_tarfile_on_every_tar_dialect(tmp_path, fmt):
    from ummae.data.shards import _index_shard, _index_with_tarfile

    names = ["k1.jpg", "sub/k2.png", "k2.cls", "d" * 120 + "/k3.jpg", "big.webp"]
    if fmt != tarfile.USTAR_FORMAT:  # names ustar cannot hold: pax records / GNU long names
        names += ["é.png", "a" * 150 + ".jpg"]
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes([i]) * (3000 if name == "big.webp" else 10 + i)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # fractional mtime: a pax header per member
            tar.addfile(info, io.BytesIO(data))
    fast, reference = _index_shard(str(shard)), _index_with_tarfile(str(shard))
    assert fast == reference and reference[1] is None  # heads too: where tarfile's member headers start
    assert [m[0] for m in fast[0]] == [n for n in names if n != "k2.cls"]
    raw = shard.read_bytes()
    assert [raw[off:off + size] for _, off, size, _ in fast[0]][0] == bytes([0]) * 10
    # a garbage header in the middle ends the shard there, with the members before it kept
    second = fast[0][1][1] - 512
    shard.write_bytes(raw[:second] + b"\x07" * 512 + raw[second + 512:])
    members, problem = _index_shard(str(shard))
    assert [m[0] for m in members] == ["k1.jpg"] and "unreadable after 1 images" in problem


def test_the_dataset_pickles_for_spawned_workers(shards):
    import pickle

    ds = TarShards(shards, transform=None)
    first = np.asarray(ds[0])  # opens a file, which the copy must not carry
    copy = pickle.loads(pickle.dumps(ds))
    assert not copy._files and np.array_equal(np.asarray(copy[0]), first)


def test_url_and_pipe_shards_are_fetched_once_into_the_cache(shards, tmp_path, monkeypatch):
    """A list of `pipe:` URLs (WebDataset's own URL/pipe support) reads the same images as the
    files; the copies are cached, so a later run needs neither the pipe nor the source."""
    monkeypatch.setenv("UMMAE_SHARD_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "remote"
    shutil.copytree(shards, source)
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"pipe:cat {source}/train-00000{k}.tar\n" for k in range(3)))
    direct = TarShards(shards / "train-{000000..000002}.tar")
    fetched = TarShards(listing)
    assert len(fetched) == len(direct) > 0
    assert all(Path(s).parent == tmp_path / "cache" for s in fetched.shards)
    for i in (0, len(direct) - 1):
        assert fetched.read_bytes(i) == direct.read_bytes(i)
    shutil.rmtree(source)  # the pipe would now fail: the cached copies serve
    assert find_shards(listing) == fetched.shards
    assert not list((tmp_path / "cache").glob(".*partial"))
    # a brace pattern over a pipe command expands to one pipe per shard
    assert len(find_shards(f"pipe:cat {shards}/train-{{000000..000001}}.tar")) == 2


def test_pretrain_on_bad_shards_fails_in_one_line_before_writing(shards, tmp_path):
    from tiny import tiny_pretrain_args

    listing = tmp_path / "urls.txt"
    listing.write_text("s3://bucket/train-000000.tar\n")
    for data in (str(shards / "train-{000000..000009}.tar"), str(listing)):
        out = tmp_path / "run"
        result = run_cli_captured(tiny_pretrain_args(out, "--data", data), out)
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
        assert "Traceback" not in result.err and not out.exists()


# -- --max-side: images re-encoded to the size training needs ---------------------------------------

def _upright_picture() -> Image.Image:
    """48 wide x 64 tall: white top quarter over a smooth dark gradient, so "upright" can be checked."""
    pixels = np.zeros((64, 48, 3), dtype=np.uint8)
    pixels[16:] = np.linspace(0, 80, 48, dtype=np.uint8)[None, :, None]
    pixels[:16] = 255
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Large and small images of several kinds; sorted names give the keys 0..4 in this order."""
    root = tmp_path_factory.mktemp("mixed")
    upright = _upright_picture()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the camera held upright
    upright.transpose(Image.Transpose.ROTATE_90).save(root / "a_rotated.jpg", quality=95, exif=exif)
    upright.resize((18, 24)).save(root / "b_small.png")
    upright.save(root / "c_small.jpg", quality=80)  # 64 px: not above --max-side 64
    upright.convert("L").resize((96, 128)).save(root / "d_grey.jpg", quality=95)
    upright.convert("CMYK").resize((96, 128)).save(root / "e_cmyk.jpg", quality=95)
    upright.resize((18, 24)).save(root / "f_small.bmp")
    transparent = upright.resize((18, 24)).convert("RGBA")
    transparent.putalpha(Image.fromarray(np.repeat(np.array([[0] * 9 + [255] * 9], np.uint8), 24, axis=0)))
    transparent.save(root / "g_alpha.png")  # left half transparent: training sees it white
    return root


def _members(shard_dir: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(next(shard_dir.glob("*.tar"))) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_max_side_stores_large_images_upright_at_n_and_small_ones_unchanged(mixed_folder, tmp_path):
    from ummae.data import load_rgb

    out = tmp_path / "s"
    result = run_cli_captured(["shards", "--data", str(mixed_folder), "--out", str(out), "--max-side", "32",
                               "--no-progress"], out)
    assert result.code == 0, result.err
    assert "longer side at most 32 px" in result.out
    members = _members(out)
    # keys are the folder positions; what is stored as a JPEG becomes .jpg, the BMP keeps its bytes
    assert [name for name, _ in members] == [f"{k:09d}.jpg" for k in range(5)] + ["000000005.bmp", "000000006.jpg"]
    assert members[5][1] == (mixed_folder / "f_small.bmp").read_bytes()  # decodes faster than a JPEG: kept
    stored = [Image.open(io.BytesIO(data)) for _, data in members]
    # above 32 px: longer side 32; the small PNGs: JPEGs at their own size (they decode slower)
    assert [im.size for im in stored] == [(24, 32), (18, 24), (24, 32), (24, 32), (24, 32), (18, 24), (18, 24)]
    assert [im.format for im in stored] == ["JPEG"] * 5 + ["BMP", "JPEG"]
    assert [im.mode for im in stored] == ["RGB", "RGB", "RGB", "L", "RGB", "RGB", "RGB"]  # grey stays grey, CMYK -> RGB
    rotated = stored[0]
    assert rotated.getexif().get(0x0112) is None  # upright pixels, no orientation tag left to apply
    expected = _upright_picture().resize((24, 32), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(rotated, dtype=float) - np.asarray(expected, dtype=float)).mean() < 3
    assert np.asarray(rotated)[:6].mean() > 240 > 60 > np.asarray(rotated)[10:].mean()  # white on top
    assert np.asarray(stored[6])[:, :7].min() > 240  # the transparent half: white, as load_rgb shows it
    # what training decodes from the shards is the folder's image, shrunk: the same picture
    for k, path in enumerate(sorted(mixed_folder.iterdir())):
        original = np.asarray(load_rgb(path).resize(stored[k].size, Image.Resampling.LANCZOS), dtype=float)
        assert np.abs(np.asarray(load_rgb(io.BytesIO(members[k][1])), dtype=float) - original).mean() < 4, path


def test_max_side_keeps_images_of_exactly_n_as_they_are(mixed_folder, tmp_path):
    out = tmp_path / "s"
    result = run_cli_captured(["shards", "--data", str(mixed_folder), "--out", str(out), "--max-side", "64",
                               "--no-progress"], out)
    assert result.code == 0, result.err
    members = _members(out)
    assert members[0][1] == (mixed_folder / "a_rotated.jpg").read_bytes()  # 48x64 upright: not above 64
    assert members[2][1] == (mixed_folder / "c_small.jpg").read_bytes()
    assert Image.open(io.BytesIO(members[3][1])).size == (48, 64)  # the 96x128 grey one is halved
    assert members[5][1] == (mixed_folder / "f_small.bmp").read_bytes()
    assert Image.open(io.BytesIO(members[1][1])).format == "JPEG"  # the PNG: re-encoded at its size


def test_auto_is_the_smallest_size_at_which_no_crop_upsamples():
    from torchvision import transforms as T

    from ummae.data.reencode import CropSafe, crop_safe_side
    from ummae.data.transforms import CROP_RATIO

    # the crop's least side is sqrt(min_crop_scale * 3/4 * W * H): bound the area, not a side
    assert crop_safe_side(256, 0.2) == pytest.approx(256 / (0.2 * 0.75) ** 0.5) == pytest.approx(661.0, abs=0.1)
    rule = CropSafe(256, 0.2)
    assert rule(4000, 3000) == (764, 573)  # a 4:3 photo: shorter side 256 / sqrt(0.2), the estimate
    assert rule(3000, 4000) == (573, 764)
    assert rule(2000, 2000) == (661, 661)
    assert rule(8000, 1000) == (2048, 256)  # a panorama: the shorter side (the fallback crop's) binds
    assert rule(500, 375) is None and rule(661, 661) is None and rule(662, 662) == (661, 661)
    assert "e.g. 764x573 for a 4:3 photo" in rule.describe()
    assert "e.g. 6106x4580" in CropSafe(2048, 0.2).describe()  # larger than the 12 MP photo of the example above

    def least_crop_side(width, height):
        """The shorter side of the smallest, most elongated crop RandomResizedCrop draws."""
        stand_in = torch.empty(1, 1, 1).expand(1, height, width)
        sides = []
        for ratio in CROP_RATIO:
            for seed in range(20):
                torch.manual_seed(seed)
                _, _, h, w = T.RandomResizedCrop.get_params(stand_in, [0.2, 0.2], [ratio, ratio])
                sides.append(min(h, w))
        return min(sides)

    for width, height in ((4000, 3000), (2000, 2000), (1000, 1600)):
        small = rule(width, height)
        assert least_crop_side(*small) >= 256
        # a few pixels smaller, and the worst crop would be upsampled: the size is the smallest
        assert least_crop_side(small[0] - 4, small[1] - 3) < 256, (width, height)


def test_max_side_auto_sizes_for_the_preset_and_the_shards_still_read(mixed_folder, tmp_path):
    from ummae.data.reencode import CropSafe

    out = tmp_path / "s"
    # ummae_swin_demo: 128 px crops, scale 0.2-1 -> sqrt(W x H) >= 331; --img-size 32 overrides it
    result = run_cli_captured(["shards", "--data", str(mixed_folder), "--out", str(out), "--max-side", "auto",
                               "--preset", "ummae_swin_demo", "--img-size", "32", "--no-progress"], out)
    assert result.code == 0, result.err
    assert "sqrt(width x height) >= 83 px" in result.out
    assert CropSafe(32, 0.2)(96, 128) == (72, 96)
    members = _members(out)
    assert Image.open(io.BytesIO(members[3][1])).size == (72, 96)  # the 96x128 ones shrunk
    assert members[0][1] == (mixed_folder / "a_rotated.jpg").read_bytes()  # 48x64: small enough
    ds = TarShards(out, pretrain_transform(32))
    assert len(ds) == 7 and ds[3].shape == (3, 32, 32)


@pytest.mark.parametrize("extra, message", [
    (["--max-side", "8"], "--max-side must be at least 16 px, got 8"),
    (["--max-side", "big"], "--max-side must be a number of pixels or auto, got 'big'"),
    (["--max-side", "auto"], "--max-side auto needs --preset NAME"),
    (["--max-side", "auto", "--preset", "ummae_swin_tiny"], "unknown preset 'ummae_swin_tiny' (--preset)"),
    (["--max-side", "64", "--preset", "demo"], "--preset only applies with --max-side auto"),
    (["--min-crop-scale", "0.3"], "--min-crop-scale only applies with --max-side auto"),
    (["--max-side", "auto", "--preset", "demo", "--min-crop-scale", "0"], "--min-crop-scale (data.min_crop_scale) must be in (0, 1]"),
    (["--max-side", "auto", "--preset", "demo", "--img-size", "8"], "--img-size (data.img_size) must be at least 16"),
    (["--max-side", "auto", "--config", "no.yaml"], "--config: 'no.yaml' does not exist"),
])
def test_bad_size_options_are_one_line_errors_before_any_work(mixed_folder, tmp_path, extra, message):
    out = tmp_path / "s"
    result = run_cli_captured(["shards", "--data", str(mixed_folder), "--out", str(out), *extra], out)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert f"ummae shards: error: {message}" in result.err and not out.exists()
