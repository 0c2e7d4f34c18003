"""Chest-X-ray foundation models: RAD-DINO (Hugging Face DINOv2), MedSigLIP, zero-shot, prompted SAM,
ViT token segmenters, embedding cache. Tiny randomly initialised models only (28-64 px)."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from covidcxr.errors import ConfigError, DataError
from tests.tiny_foundation import tiny_clip, tiny_sam, tiny_siglip

HF_DIM, HF_PATCH, HF_MLP, HF_SIZE = 16, 14, 32, 28


def _gray(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1)).astype("float32")


@pytest.fixture(scope="module")
def siglip_parts():
    """Tiny SigLIP (both towers, 32 px, patch 16, D=16) with a SentencePiece vocabulary trained here."""
    return tiny_siglip()


@pytest.fixture(scope="module")
def presets(siglip_parts, tmp_path_factory):
    """Preset folders: siglip (backbone + tokenizer), siglip_notok (backbone only), clip, and a Hugging Face
    DINOv2 folder (config.json + model.safetensors written from numpy) with its weight arrays."""
    root = tmp_path_factory.mktemp("presets")
    backbone, tok = siglip_parts
    backbone.save_to_preset(str(root / "siglip"))
    tok.save_to_preset(str(root / "siglip"))
    backbone.save_to_preset(str(root / "siglip_notok"))
    tiny_clip(50, 8).save_to_preset(str(root / "clip"))
    arrays = _write_hf_dinov2(root / "rad-dino")
    return root, arrays


def _hf_dinov2_arrays(seed=0) -> dict:
    """A DINOv2 state dict in Hugging Face (PyTorch) layout: Linear [out, in], Conv2d [out, in, kh, kw]."""
    rng = np.random.default_rng(seed)
    D, mlp, n = HF_DIM, HF_MLP, (HF_SIZE // HF_PATCH) ** 2

    def r(*shape, base=0.0):
        return (base + rng.normal(0, 0.05, shape)).astype("float32")

    w = {"embeddings.cls_token": r(1, 1, D), "embeddings.mask_token": r(1, D),
         "embeddings.position_embeddings": r(1, 1 + n, D),
         "embeddings.patch_embeddings.projection.weight": r(D, 3, HF_PATCH, HF_PATCH),
         "embeddings.patch_embeddings.projection.bias": r(D), "layernorm.weight": r(D, base=1),
         "layernorm.bias": r(D)}
    p = "encoder.layer.0"
    for name in ("norm1", "norm2"):
        w[f"{p}.{name}.weight"], w[f"{p}.{name}.bias"] = r(D, base=1), r(D)
    for name in ("query", "key", "value"):
        w[f"{p}.attention.attention.{name}.weight"], w[f"{p}.attention.attention.{name}.bias"] = r(D, D), r(D)
    w[f"{p}.attention.output.dense.weight"], w[f"{p}.attention.output.dense.bias"] = r(D, D), r(D)
    w[f"{p}.layer_scale1.lambda1"], w[f"{p}.layer_scale2.lambda1"] = r(D, base=1), r(D, base=1)
    w[f"{p}.mlp.fc1.weight"], w[f"{p}.mlp.fc1.bias"] = r(mlp, D), r(mlp)
    w[f"{p}.mlp.fc2.weight"], w[f"{p}.mlp.fc2.bias"] = r(D, mlp), r(D)
    return w


def _write_hf_dinov2(folder, model_type="dinov2"):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    arrays = _hf_dinov2_arrays()
    save_file(arrays, str(folder / "model.safetensors"))
    config = {"model_type": model_type, "architectures": ["Dinov2Model"], "image_size": HF_SIZE,
              "patch_size": HF_PATCH, "hidden_size": HF_DIM, "num_hidden_layers": 1, "num_attention_heads": 2,
              "mlp_ratio": HF_MLP / HF_DIM, "layerscale_value": 1.0, "use_swiglu_ffn": False,
              "hidden_dropout_prob": 0.0, "drop_path_rate": 0.0}
    (folder / "config.json").write_text(json.dumps(config))
    return arrays


def _assert_hf_weights_arrived(model, arrays):
    np.testing.assert_array_equal(np.asarray(model.embeddings.cls_token), arrays["embeddings.cls_token"])
    kernel = arrays["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(model.embeddings.patch_embeddings.projection.kernel), kernel)


def test_rad_dino_from_a_hugging_face_folder_and_from_hf_handle(presets, monkeypatch):
    from keras_hub.src.utils import preset_utils

    from covidcxr.models.registry import build_backbone, get_spec
    from covidcxr.models.weights import PRESET

    root, arrays = presets
    spec = get_spec("rad_dino")
    model = build_backbone(spec, 42, str(root / "rad-dino"))  # 42 px: position embeddings interpolated from 28
    assert type(model).__name__ == "DINOV2Backbone" and tuple(model.output.shape) == (None, 1 + 9, HF_DIM)
    _assert_hf_weights_arrived(model, arrays)

    asked = []

    def fake_download(repo_id, filename, **kw):  # Hugging Face, served from the local folder
        asked.append((repo_id, filename))
        path = root / "rad-dino" / filename
        if not path.exists():
            raise preset_utils.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(preset_utils.huggingface_hub, "hf_hub_download", fake_download)
    for weights in ("imagenet", PRESET + "hf://microsoft/rad-dino", "hf://microsoft/rad-dino"):
        _assert_hf_weights_arrived(build_backbone(spec, 28, weights), arrays)
    assert ("microsoft/rad-dino", "config.json") in asked and ("microsoft/rad-dino", "model.safetensors") in asked

    # preprocessor_config.json is checked against rad_dino's normalisation
    copy = root / "rad-dino-pre"
    shutil.copytree(root / "rad-dino", copy)
    pre = {"do_normalize": True, "image_mean": [0.5307] * 3, "image_std": [0.2583] * 3, "crop_size": 518}
    (copy / "preprocessor_config.json").write_text(json.dumps(pre))
    build_backbone(spec, 28, str(copy))
    (copy / "preprocessor_config.json").write_text(json.dumps({**pre, "image_mean": [0.485, 0.456, 0.406]}))
    with pytest.raises(ConfigError, match="not rad_dino weights"):
        build_backbone(spec, 28, str(copy))


def test_folders_of_other_architectures_are_refused(presets, tmp_path):
    from covidcxr.models.registry import build_backbone, get_spec

    root, _ = presets
    spec = get_spec("rad_dino")
    for model_type in ("bert", "vit"):
        folder = tmp_path / model_type
        _write_hf_dinov2(folder, model_type)
        with pytest.raises(ConfigError, match=f"'{model_type}' checkpoint.*expects model_type 'dinov2'"):
            build_backbone(spec, 28, str(folder))
    (tmp_path / "nosafe").mkdir()
    (tmp_path / "nosafe" / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    (tmp_path / "nosafe" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no model.safetensors .only pytorch_model.bin"):
        build_backbone(spec, 28, str(tmp_path / "nosafe"))
    with pytest.raises(ConfigError, match="holds a SigLIPBackbone"):
        build_backbone(spec, 28, str(root / "siglip"))


def test_siglip_and_clip_presets_are_not_interchangeable(presets):
    from covidcxr.vlm.siglip import load_siglip
    from covidcxr.models.registry import build_backbone, get_spec
    from covidcxr.models.weights import PRESET

    root, _ = presets
    with pytest.raises(ConfigError, match=r"holds a CLIPBackbone .*medsiglip is a SigLIPVisionEncoder \(SigLIP\)"):
        build_backbone(get_spec("medsiglip"), 32, str(root / "clip"))
    with pytest.raises(ConfigError, match=r"holds a SigLIPBackbone .*clip_vit_b16 is a CLIPVisionEncoder \(CLIP\)"):
        build_backbone(get_spec("clip_vit_b16"), 32, str(root / "siglip"))
    with pytest.raises(ConfigError, match="clip_vit_base_patch16 holds a CLIPBackbone"):  # offline: keras-hub's table
        build_backbone(get_spec("medsiglip"), 32, PRESET + "clip_vit_base_patch16")
    with pytest.raises(ConfigError, match="use --image-size 32"):
        build_backbone(get_spec("medsiglip"), 48, str(root / "siglip"))
    with pytest.raises(ConfigError, match="holds a CLIPBackbone.*covidcxr.zeroshot"):
        load_siglip(str(root / "clip"))
    with pytest.raises(ConfigError, match="holds a CLIPBackbone"):
        load_siglip("clip_vit_base_patch16")
    with pytest.raises(ConfigError, match="lacks tokenizer.json"):
        load_siglip(str(root / "siglip_notok"))


def test_foundation_classifiers_probe_and_reload(presets, siglip_parts, tmp_path):
    import keras

    from covidcxr.vlm.siglip import gray_to_siglip
    from covidcxr.models.tokens import freeze_position_embeddings
    from covidcxr.models.classifier import build_classifier, freeze_backbone, unfreeze_top
    from covidcxr.models.registry import get_spec

    root, _ = presets
    # the medsiglip probe pools to exactly the SigLIP image embedding (MAP head), normalised as SigLIP wants
    model, x = build_classifier(get_spec("medsiglip"), 3, 32, str(root / "siglip")), _gray(4, 32)
    want = siglip_parts[0].vision_encoder({"images": gray_to_siglip(x, 32)})
    got = keras.Model(model.input, model.get_layer("gap").output).predict(x, verbose=0)
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
    for arch, size, folder in (("rad_dino", 28, "rad-dino"), ("medsiglip", 32, "siglip")):
        model = build_classifier(get_spec(arch), 3, size, str(root / folder))
        freeze_backbone(model)
        model.compile("adam", "sparse_categorical_crossentropy")
        before = [np.asarray(w).copy() for w in model.get_layer("backbone").weights]
        x, y = _gray(4, size), np.array([0, 1, 2, 0])
        model.train_on_batch(x, y)
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.get_layer("backbone").weights))
        assert unfreeze_top(model, "all") > 0  # fine-tuning: the encoder moves
        freeze_position_embeddings(model.get_layer("backbone"))  # keras-hub DINOv2 saves them lossily
        model.compile("adam", "sparse_categorical_crossentropy")
        model.train_on_batch(x, y)
        assert not all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.get_layer("backbone").weights))
        model.save(tmp_path / f"{arch}.keras")
        again = keras.saving.load_model(tmp_path / f"{arch}.keras")
        np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_zero_shot_sigmoid_scores(presets, siglip_parts):
    from covidcxr.vlm import siglip as S

    root, _ = presets
    backbone, tok = S.load_siglip(str(root / "siglip"))
    backbone.siglip_head.logit_scale.assign(np.log(10.0))
    backbone.siglip_head.logit_bias.assign(-2.0)
    scale, bias = S.logit_params(backbone)
    assert abs(scale - 10.0) < 1e-4 and abs(bias + 2.0) < 1e-6
    classes = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    prompts = S.check_prompts(S.cxr_prompts(classes), classes)
    txt, img = S.text_embeddings(backbone, tok, prompts), S.image_embeddings(backbone, _gray(5, 64), batch_size=2)
    assert txt.shape == (4, 16) and img.shape == (5, 16)
    assert np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5) and np.allclose(np.linalg.norm(img, axis=1), 1)
    scores = S.sigmoid_scores(img, txt, scale, bias)
    probs = S.scores_to_probabilities(scores)
    assert scores.shape == probs.shape == (5, 4) and ((scores > 0) & (scores < 1)).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    # one prompt per class: our logits equal the model's own SigLIP head on the same tokens and pixels
    one = {c: [p[0]] for c, p in prompts.items()}
    ids = S.token_ids(tok, [p[0] for p in one.values()], 8)
    x = np.asarray(S.gray_to_siglip(_gray(5, 32), 32))
    ref = np.asarray(backbone({"images": x, "token_ids": ids})["vision_logits"])
    ours = S.sigmoid_scores(S.image_embeddings(backbone, _gray(5, 32)), S.text_embeddings(backbone, tok, one),
                            scale, bias)
    np.testing.assert_allclose(np.log(ours / (1 - ours)), ref, atol=1e-3)
    with pytest.raises(DataError, match="Martian"):
        S.check_prompts({**prompts, "Martian": ["a martian chest"]}, classes)
    with pytest.raises(DataError, match="no prompts for class"):
        S.check_prompts({"COVID-19": ["a"]}, ["COVID-19", "Non-COVID", "Normal"])


def test_text_prompted_segmentation(siglip_parts, tmp_path):
    from covidcxr.vlm import prompted as P

    backbone, tok = siglip_parts
    gray = _gray(3, 48)
    sim = P.similarity_map(backbone, tok, gray, "lungs")
    assert sim.shape == (3, 2, 2) and np.all(np.abs(sim) <= 1 + 1e-5)
    hand = np.array([[[0.0, 0.1], [0.9, 1.0]]])
    boxes, points, labels = P.prompts_from_map(hand, 48, threshold=0.5, top_k=2, negatives=1)
    np.testing.assert_allclose(boxes, [[0, 24, 48, 48]])
    np.testing.assert_allclose(points, [[[36, 36], [12, 36], [12, 12]]])
    np.testing.assert_array_equal(labels, [[1, 1, 0]])
    sam = tiny_sam(64)
    P.check_segmentation_prompt(backbone, "opacity")
    sim = P.similarity_map(backbone, tok, gray, "opacity")
    boxes, points, labels = P.prompts_from_map(sim, gray.shape[1])
    masks = P.sam_segment(sam, gray, boxes, points, labels)
    assert masks.shape == (3, 48, 48) and masks.dtype == bool and boxes.shape == (3, 4) and points.shape == (3, 3, 2)
    only_points = P.sam_segment(sam, gray, points=points, labels=labels)
    assert only_points.shape == (3, 48, 48)
    with pytest.raises(ConfigError, match="box or points"):
        P.sam_segment(sam, gray)
    (tmp_path / "p.json").write_text(json.dumps({"heart": ["the heart", "cardiac silhouette"]}))
    (tmp_path / "p.yaml").write_text("lungs:\n  - the lungs\n")
    assert P.read_prompt_file(tmp_path / "p.json")["heart"][1] == "cardiac silhouette"
    assert P.resolve_prompt("heart", P.read_prompt_file(tmp_path / "p.json")) == ["the heart", "cardiac silhouette"]
    assert P.read_prompt_file(tmp_path / "p.yaml") == {"lungs": ["the lungs"]}
    (tmp_path / "bad.json").write_text(json.dumps({"lungs": []}))
    with pytest.raises(DataError, match="non-empty list"):
        P.read_prompt_file(tmp_path / "bad.json")


def test_segmentation_prompt_refused_for_classification_models(presets, siglip_parts):
    import keras_hub

    from covidcxr.vlm.prompted import check_segmentation_prompt
    from covidcxr.models.classifier import build_classifier
    from covidcxr.models.registry import get_spec

    root, _ = presets
    check_segmentation_prompt(siglip_parts[0], "lungs")
    check_segmentation_prompt("medsiglip", "lungs")
    check_segmentation_prompt(str(root / "siglip"), "lungs")
    clip = keras_hub.models.Backbone.from_preset(str(root / "clip"))
    for model in (clip, "rad_dino", build_classifier(get_spec("rad_dino"), 3, 28, str(root / "rad-dino"))):
        with pytest.raises(ConfigError, match="--prompt 'lungs': .* classification-only model"):
            check_segmentation_prompt(model, "lungs")


def test_vit_token_segmenters_train_a_step(presets):
    from covidcxr.models.classifier import freeze_backbone
    from covidcxr.models.segmentation import build_segmenter, seg_arch_names, seg_spec

    root, _ = presets
    assert {"setr_rad_dino", "setr_medsiglip", "setr_dinov2_small", "setr_clip_vit_b16"} <= set(seg_arch_names())
    assert seg_spec("setr_rad_dino").size_multiple == 14 and seg_spec("setr_medsiglip").size_multiple == 16
    with pytest.raises(ConfigError, match="Use setr_rad_dino"):
        seg_spec("unet_rad_dino")
    with pytest.raises(ConfigError, match="needs a ViT token encoder"):
        seg_spec("setr_resnet50")
    with pytest.raises(ConfigError, match="multiple of 14"):
        build_segmenter("setr_rad_dino", 32, str(root / "rad-dino"))
    x = _gray(2, 28)
    mask = (np.random.default_rng(1).random((2, 28, 28, 1)) > 0.5).astype("float32")
    model = build_segmenter("setr_rad_dino", 28, str(root / "rad-dino"), decoder_filters=(8, 8, 8, 8))
    assert model.output.shape[1:] == (28, 28, 1)
    freeze_backbone(model)
    model.compile("adam", "binary_crossentropy")
    before = [np.asarray(w).copy() for w in model.get_layer("backbone").weights]
    assert np.isfinite(model.train_on_batch(x, mask))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.get_layer("backbone").weights))
    multi = build_segmenter("setr_medsiglip", 32, str(root / "siglip"), num_classes=3, decoder_filters=(8, 8))
    multi.compile("adam", {"label": "sparse_categorical_crossentropy", "mask": "binary_crossentropy"})
    x32, m32 = _gray(2, 32), np.zeros((2, 32, 32, 1), "float32")
    loss = multi.train_on_batch(x32, {"label": np.array([0, 2]), "mask": m32})
    assert np.all(np.isfinite(loss)) and multi.get_layer("backbone").name == "backbone"


def _cache_fixture(tmp_path, n=6):
    """n small files, their content keys, and a compute_fn that records its calls and returns row value i."""
    from covidcxr.training.embeddings import image_keys

    files = [tmp_path / f"img{i}.png" for i in range(n)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * (10 + i))
    state = {"keys": image_keys(files), "calls": []}
    state["value"] = {k: float(i) for i, k in enumerate(state["keys"])}

    def compute(pos):
        state["calls"].append(list(pos))
        return np.stack([np.full(4, state["value"][state["keys"][p]], np.float32) for p in pos])

    return files, state, compute


def test_embedding_cache_computes_once_and_invalidates(tmp_path):
    from covidcxr.training.embeddings import EmbeddingCache, image_keys, prep_key

    files, state, compute = _cache_fixture(tmp_path)
    keys = state["keys"]
    cache, prep = EmbeddingCache(tmp_path / "cache"), prep_key(224, "rad_dino", "clahe")
    state["keys"] = keys + [keys[0]]  # a duplicate key is computed once and returned twice
    first = cache.get(state["keys"], "enc1", prep, compute, batch_size=4)
    assert first.dtype == np.float32 and first.shape == (7, 4) and np.array_equal(first[:, 0], [0, 1, 2, 3, 4, 5, 0])
    assert state["calls"] == [[0, 1, 2, 3], [4, 5]] and cache.last_stats["computed"] == 6
    state["calls"].clear()
    state["keys"] = keys[::-1]  # reused, in the order asked
    assert np.array_equal(cache.get(state["keys"], "enc1", prep, compute)[:, 0], [5, 4, 3, 2, 1, 0])
    assert state["calls"] == [] and cache.last_stats["hits"] == 6
    files[2].write_bytes(b"changed")  # a changed image has a new key: only it is computed
    state["keys"] = image_keys(files)
    state["value"][state["keys"][2]] = 9.0
    assert cache.get(state["keys"], "enc1", prep, compute)[2, 0] == 9 and state["calls"] == [[2]]
    state["calls"].clear()
    cache.get(state["keys"], "enc2", prep, compute)  # other weights: everything again
    assert state["calls"] == [list(range(6))] and cache.last_stats["hits"] == 0
    cache.get(state["keys"], "enc1", prep_key(448, "rad_dino", "clahe"), compute)  # other preprocessing too
    assert len(state["calls"]) == 2
    assert not list((tmp_path / "cache").rglob(".tmp-*"))  # nothing half-written left behind
    assert image_keys(files, "stat") != state["keys"]


def test_embedding_cache_concurrent_writers_and_encoder_id(tmp_path):
    import threading
    import time

    import keras

    from covidcxr.training.embeddings import EmbeddingCache, encoder_id

    _, state, compute = _cache_fixture(tmp_path)

    def slow(pos):
        time.sleep(0.05)
        return compute(pos)

    results = []
    threads = [threading.Thread(target=lambda: results.append(
        EmbeddingCache(tmp_path / "c").get(state["keys"], "e", "p", slow, batch_size=2))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(np.array_equal(r[:, 0], np.arange(6)) for r in results)
    again = EmbeddingCache(tmp_path / "c")
    assert np.array_equal(again.get(state["keys"], "e", "p", slow)[:, 0], np.arange(6))
    assert again.last_stats["computed"] == 0

    dense = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    before = encoder_id(dense)
    assert encoder_id(dense) == before == encoder_id(dense, "all")  # deterministic; 2 tensors: all hashed
    dense.layers[0].kernel.assign(dense.layers[0].kernel + 1.0)
    assert encoder_id(dense) != before


def test_rad_dino_from_the_command_line_probe_and_lung_segmenter(presets, synth_dir, tmp_path, capsys):
    """`train --arch rad_dino --preset <Hugging Face folder>`: the linear probe on cached embeddings, and
    the same encoder as a lung-segmentation encoder (`setr_rad_dino`, frozen head phase then fine-tuning)."""
    from covidcxr import train

    root, _ = presets
    common = ["--data", str(synth_dir), "--preset", str(root / "rad-dino"), "--image-size", str(HF_SIZE),
              "--batch-size", "8", "--export-dir", "none", "--cache-dir", str(tmp_path / "cache")]
    assert train.main([*common, "--arch", "rad_dino", "--freeze-encoder", "--epochs", "2",
                       "--run-dir", str(tmp_path / "probe")]) == 0
    out = capsys.readouterr().out
    assert "cached embeddings" in out and "linear probe" in out
    card = json.loads((tmp_path / "probe" / "model_card.json").read_text())
    assert card["arch"] == "rad_dino" and card["normalization"] == "rad_dino"
    assert train.main([*common, "--task", "segment", "--arch", "setr_rad_dino", "--epochs", "1",
                       "--fine-tune-epochs", "1", "--run-dir", str(tmp_path / "seg")]) == 0
    hist = pd.read_csv(tmp_path / "seg" / "history.csv")
    assert hist["phase"].tolist() == [1, 2] and hist["val_dice"].between(0, 1).all()
