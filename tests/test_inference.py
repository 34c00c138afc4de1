"""The embedding API, the image search command and selection maps, on a trained tiny run."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from e2_jax import errors, search, visualize
from e2_jax.data import pipeline
from e2_jax.errors import MissingError
from e2_jax.evaluation import evaluate, tagging
from e2_jax.inference import Encoder
from e2_jax.sharding import batch_sharding
from e2_jax.training import train
from tests.test_train import tiny_config


def _raw_first_views(data_dir: str, n: int) -> list[np.ndarray]:
    source = pipeline.Source("synth_fashion/tiny", "validation", data_dir)
    spec = {"images": source.features.tf_example_spec["images"]}
    return [tf.io.decode_image(tf.io.parse_single_example(r, spec)["images"][0], channels=3).numpy()
            for r in source.read(range(n))]


@pytest.fixture(scope="module")
def encoder(trained_tiny):
    workdir, _ = trained_tiny
    return Encoder.from_workdir(workdir, batch_size=4)


def test_encoder_gives_the_evaluation_embeddings(synth_tiny, trained_tiny, encoder):
    """The API on raw images and strings equals the trainer's evaluation on the pipeline's
    batches, for a count (7) that does not divide the batch (4)."""
    workdir, _ = trained_tiny
    assert "best finetune" in encoder.source and (workdir / "model.json").is_file()
    spec, data = train.prepare(tiny_config(synth_tiny))
    images_fn, texts_fn = evaluate.make_embed(spec)
    batch = next(pipeline.eval_batches(data.eval, spec.pre, global_batch=16, sharding=batch_sharding(spec.mesh)))
    want_images = np.array(images_fn(encoder.params, batch))[:7]
    want_texts = np.array(texts_fn(encoder.params, batch))[:7]
    want_images /= np.linalg.norm(want_images, axis=1, keepdims=True)
    want_texts /= np.linalg.norm(want_texts, axis=1, keepdims=True)
    got_images = encoder.encode_images(_raw_first_views(synth_tiny, 7))
    source = pipeline.Source("synth_fashion/tiny", "validation", synth_tiny)
    fields = source.scan(["composition", "subcategory", "brand", "season", "description"])
    texts = [pipeline.FASHIONGEN_TEXT.format(**{k: fields[k][i] for k in fields if k != "views"}) for i in range(7)]
    got_texts = encoder.encode_texts(texts)
    np.testing.assert_allclose(got_images, want_images, atol=2e-5)
    np.testing.assert_allclose(got_texts, want_texts, atol=2e-5)
    out = encoder.image_outputs(_raw_first_views(synth_tiny, 3))
    assert out.region_embeddings.shape == (3, 2, encoder.clip.embed_dim) and out.picks.shape == (3, 2, 4)


def test_bad_images_are_named(tmp_path, encoder):
    with pytest.raises(FileNotFoundError, match=r"no_such\.png"):
        encoder.encode_images([tmp_path / "no_such.png"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png is not a readable image"):
        encoder.encode_images([tmp_path / "broken.png"])
    with pytest.raises(FileNotFoundError, match="not a training workdir"):
        Encoder.from_workdir(tmp_path)


def test_encoder_on_preprocessed_arrays_and_token_ids_equals_files_and_strings(synth_tiny, encoder, tmp_path):
    """Preprocessed pixels [N, S, S, 3] and token ids [N, L] give exactly what the files and
    strings they came from give (5 rows: not a multiple of the batch, 4); raw embeddings are
    the normalised ones before the L2 normalisation."""
    paths = []
    for i, image in enumerate(_raw_first_views(synth_tiny, 5)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    texts = ["red wool coat", "a", "black leather biker jacket with silver zips", "blue dress", ""]
    pixels, tokens = encoder.preprocess_images(paths), encoder.tokenize(texts)
    size, length = encoder.clip.image_size, encoder.clip.context_length
    assert pixels.shape == (5, size, size, 3) and pixels.dtype == np.float32 and -2 < pixels.min() < pixels.max() < 2.2
    assert tokens.shape == (5, length) and tokens.dtype == np.int32 and tokens[1, 0] == 49406
    from_files, from_arrays = encoder.image_outputs(paths), encoder.image_outputs(pixels)
    for got, want in zip(from_arrays, from_files, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(encoder.encode_texts(tokens), encoder.encode_texts(texts))
    raw = encoder.image_outputs(pixels, normalize=False)
    norms = np.linalg.norm(raw.global_embedding, axis=1, keepdims=True)
    assert not np.allclose(norms, 1.0)
    np.testing.assert_allclose(raw.global_embedding / norms, from_files.global_embedding, atol=1e-6)
    np.testing.assert_allclose(raw.region_embeddings / np.linalg.norm(raw.region_embeddings, axis=-1, keepdims=True),
                               from_files.region_embeddings, atol=1e-6)
    np.testing.assert_array_equal(raw.picks, from_files.picks)
    raw_texts = encoder.encode_texts(tokens, normalize=False)
    np.testing.assert_allclose(raw_texts / np.linalg.norm(raw_texts, axis=1, keepdims=True),
                               encoder.encode_texts(texts), atol=1e-6)
    with pytest.raises(ValueError, match=rf"float \[N, {size}, {size}, 3\]"):
        encoder.encode_images(pixels[:, :-1])
    with pytest.raises(ValueError, match="NaN"):
        encoder.encode_images(np.full_like(pixels, np.nan))
    with pytest.raises(ValueError, match=rf"\[N, {length}\]"):
        encoder.encode_texts(tokens[:, :10])
    with pytest.raises(ValueError, match=r"\[0, 49408\)"):
        encoder.encode_texts(tokens + 49408)
    assert encoder.encode_images(pixels[:0]).shape == (0, encoder.clip.embed_dim)


def test_index_a_folder_and_query_it(synth_tiny, trained_tiny, encoder, tmp_path, capsys):
    workdir, _ = trained_tiny
    folder = tmp_path / "catalog" / "sub"
    folder.mkdir(parents=True)
    for i, image in enumerate(_raw_first_views(synth_tiny, 6)):
        Image.fromarray(image).save(folder / f"item_{i}.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    search.main(["index", "--workdir", str(workdir), "--images", str(tmp_path / "catalog"),
                 "--out", str(tmp_path / "index.npz"), "--batch-size", "4"])
    assert "indexed 6 images" in capsys.readouterr().err
    picture = folder / "item_4.png"
    search.main(["query", "--index", str(tmp_path / "index.npz"), "red", "blue dress", str(picture), "--top", "3"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "text: red" and printed[4] == "text: blue dress" and len(printed) == 12
    # An image query says so, and an image of the index finds itself first.
    assert printed[8] == f"image: {picture}" and printed[9].endswith(str(picture)) and " 1.000 " in printed[9]
    # The ranking is the cosine similarity of the text with each indexed image.
    got = search.query(tmp_path / "index.npz", ["blue dress"], encoder, top=6)[0]
    with np.load(tmp_path / "index.npz") as data:
        scores = encoder.encode_texts(["blue dress"])[0] @ data["embeddings"].T
    assert [m.score for m in got] == pytest.approx(sorted(scores, reverse=True), abs=1e-6)
    assert all(m.view is None for m in got)  # a folder's images have no views
    with pytest.raises(MissingError, match="names an image file that does not exist"):
        search.query(tmp_path / "index.npz", ["missing.jpg"], encoder)


def _mixed_folder(root, synth_tiny):
    """3 good images, a truncated JPEG, a text file named .jpg, an empty sub-folder and a
    folder named like an image."""
    (root / "sub").mkdir(parents=True)
    for i, image in enumerate(_raw_first_views(synth_tiny, 3)):
        Image.fromarray(image).save(root / ("sub" if i else ".") / f"item_{i}.png")
    Image.fromarray(_raw_first_views(synth_tiny, 1)[0]).save(root / "whole.jpg")
    (root / "cut.jpg").write_bytes((root / "whole.jpg").read_bytes()[:200])
    (root / "whole.jpg").unlink()
    (root / "notes.jpg").write_text("not an image")
    (root / "empty").mkdir()
    (root / "folder.png").mkdir()
    return ["cut.jpg", "notes.jpg"]


def test_every_folder_tool_skips_and_names_unreadable_files(synth_tiny, trained_tiny, tmp_path, capsys):
    workdir, _ = trained_tiny
    root = tmp_path / "images"
    bad = _mixed_folder(root, synth_tiny)

    def skipped(err: str) -> list[str]:
        lines = [line for line in err.splitlines() if line.startswith("  skipped ")]
        assert all(line.count(str(root)) == 1 for line in lines), lines  # each path named once
        return sorted(line.split(str(root) + "/")[1].split(" ")[0] for line in lines)

    search.main(["index", "--workdir", str(workdir), "--images", str(root), "--out", str(tmp_path / "i.npz")])
    err = capsys.readouterr().err
    assert "indexed 3 images" in err and "skipped 2 unreadable" in err and skipped(err) == bad
    tagging.main(["tag", "--workdir", str(workdir), "--images", str(root), "--fields", "brand"])
    captured = capsys.readouterr()
    assert sum(line.endswith(".png") for line in captured.out.splitlines()) == 3
    assert "tagged 3 images; skipped 2 unreadable" in captured.err and skipped(captured.err) == bad
    visualize.main(["--workdir", str(workdir), "--images", str(root), "--out", str(tmp_path / "maps")])
    captured = capsys.readouterr()
    assert "3 selection maps" in captured.out and skipped(captured.out) == bad
    assert len(list((tmp_path / "maps").glob("*_selection.png"))) == 3
    # An input without any image is one error line.
    (tmp_path / "nothing").mkdir()
    for main in (lambda: search.main(["index", "--workdir", str(workdir), "--images", str(tmp_path / "nothing"),
                                      "--out", str(tmp_path / "n.npz")]),
                 lambda: tagging.main(["tag", "--workdir", str(workdir), "--images", str(tmp_path / "nothing")])):
        with pytest.raises(SystemExit) as exit_:
            errors.main(main)
        assert exit_.value.code == 2
        nothing = tmp_path / "nothing"
        assert capsys.readouterr().err.strip() == f"error: no image (.jpg, .jpeg, .png, .webp) in {nothing}"


def test_selection_maps_box_the_picked_patches(synth_tiny, encoder, tmp_path):
    images = _raw_first_views(synth_tiny, 3)
    paths = visualize.write_selection_maps(encoder, images, ["a", "b", "c"], tmp_path)
    picks = encoder.image_outputs(images).picks
    size, patch = encoder.clip.image_size, encoder.clip.patch_size
    scale = max(visualize.SCALE, -(-256 // size))
    for path, pick in zip(paths, picks, strict=True):
        drawn = np.asarray(Image.open(path).convert("RGB"))
        assert drawn.shape[1] == 2 * (size * scale + 8)  # one panel per group (brand, season)
        for g in range(2):
            colour = visualize.COLOURS[g]
            p = int(pick[0, 2 * g])  # the group's first token, first fusion block: a solid box
            row, col = divmod(p, size // patch)
            x = g * (size * scale + 8) + col * patch * scale + 2
            y = 18 + row * patch * scale + 2 + patch * scale // 2  # the middle of the box's left edge
            assert tuple(drawn[y, x]) == colour, (path, g, p)


def test_workdir_exported_as_a_model_directory_encodes_the_same(trained_tiny, encoder, tmp_path, capsys):
    """`convert from-workdir` writes the run's best parameters as a model directory (with its
    model.json), which `from_pretrained` loads to the same embeddings; the export refuses to
    overwrite, and a directory that is no workdir is named in the error."""
    from e2_jax import convert

    workdir, _ = trained_tiny
    out = tmp_path / "exported"
    assert convert.main(["from-workdir", str(workdir), str(out)]) == 0
    assert "E² model" in capsys.readouterr().out and (out / "model.json").is_file()
    exported = Encoder.from_pretrained(out, batch_size=4)
    images = [np.full((40, 32, 3), v, np.uint8) for v in (0, 90, 200)]
    np.testing.assert_array_equal(exported.encode_images(images), encoder.encode_images(images))
    np.testing.assert_array_equal(exported.encode_texts(["a red coat", "x"]), encoder.encode_texts(["a red coat", "x"]))
    assert convert.main(["from-workdir", str(workdir), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert.main(["from-workdir", str(tmp_path / "nothing"), str(tmp_path / "m")]) == 2
    assert "not a training workdir" in capsys.readouterr().err
