"""Preprocessing into shards, the shard dataset and the batch loader, and every bad input."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from distill.cli import main as cli_main
from distill.config import ConfigError
from distill.data import preprocess as prep
from distill.data.loader import BatchLoader
from distill.data.preprocess import preprocess
from distill.data.shards import MANIFEST, ShardDataset, ShardError
from distill.errors import InputError
from distill.storage import LocalStore
from distill.models.wan import WanPlugin
from distill.training.trainer import Trainer
from distill.video import read_video, write_video
from tiny import tiny_config, tiny_raw

N_VIDEOS, FRAMES, SIZE = 10, 5, 16


def make_videos(folder, n=N_VIDEOS, frames=FRAMES, height=SIZE, width=SIZE):
    """Small real mp4 files (a bright square moving right) and their captions table."""
    rows = []
    for i in range(n):
        clip = np.full((frames, height, width, 3), 30 + 10 * i, np.uint8)
        for f in range(frames):
            clip[f, 4:10, (f + i) % (width - 6) : (f + i) % (width - 6) + 6] = (220, 40 + 15 * i, 40)
        name = f"videos/{i:03d}.mp4"
        write_video(clip, folder / name)
        rows.append({"video": name, "caption": f"a red square number {i} moving right"})
    pd.DataFrame(rows).to_csv(folder / "captions.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def written_videos(tmp_path_factory):
    """make_videos once for the module (10 mp4 encodes): each test gets a copy of these files (`videos`)."""
    return make_videos(tmp_path_factory.mktemp("videos") / "data")


@pytest.fixture
def videos(tmp_path, written_videos):
    """tmp_path/data: the same bytes as make_videos(tmp_path / "data"), copied; the test may damage or extend them."""
    return Path(shutil.copytree(written_videos, tmp_path / "data"))


def data_config(tmp_path, videos, **data):
    base = {"videos": str(videos), "shards": str(tmp_path / "shards"), "num_frames": FRAMES, "height": SIZE,
            "width": SIZE, "shard_size": 4, "preprocess_batch_size": 3}
    return {**base, **data}


def test_pixel_shards_hold_the_videos_and_caption_embeddings(tmp_path, videos):
    cfg = tiny_config(tmp_path / "run", data=data_config(tmp_path, videos))
    manifest = json.loads(Path(preprocess(cfg, progress=False)).read_text())
    assert manifest["count"] == N_VIDEOS and [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["fields"] == ["prompt_embeds", "pixels"] and manifest["model"]["pixel_space"] is True
    assert manifest["shards"][0]["tensors"]["pixels"] == {"shape": [4, 3, FRAMES, SIZE, SIZE], "dtype": "uint8"}

    plugin = WanPlugin(cfg, device=torch.device("cpu"))
    data = ShardDataset(LocalStore(cfg.data.shards), identity=plugin.identity(), max_text_length=16)
    assert len(data) == N_VIDEOS and set(data.fields) == {"prompt_embeds", "pixels", "negative_prompt_embeds"}
    captions = pd.read_csv(videos / "captions.csv")
    for i in (0, 5, 9):
        item = data[i]
        frames = read_video(videos / captions.video[i])[:FRAMES]
        expected = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1
        torch.testing.assert_close(item["pixels"], expected)
        ref = plugin.encode_prompts([captions.caption[i]])[0]
        assert item["prompt_embeds"].shape == ref.shape == (16, 32)
        torch.testing.assert_close(item["prompt_embeds"], ref, rtol=2e-2, atol=2e-2)  # stored in bf16
    neg = plugin.encode_prompts([""])[0]
    torch.testing.assert_close(data[0]["negative_prompt_embeds"], neg, rtol=2e-2, atol=2e-2)


def test_vae_shards_hold_normalised_latents_and_videos_are_resized(tmp_path):
    videos = make_videos(tmp_path / "data", n=3, height=24, width=20)  # centre-cropped and resized to 16 x 16
    cfg = tiny_config(tmp_path / "run", model={"pixel_space": False}, data=data_config(tmp_path, videos))
    preprocess(cfg, progress=False)
    plugin = WanPlugin(cfg, device=torch.device("cpu"))
    data = ShardDataset(LocalStore(cfg.data.shards), identity=plugin.identity(), max_text_length=16)
    clip = prep.load_clip(videos / "videos/001.mp4", FRAMES, SIZE, SIZE)
    assert clip.shape == (3, FRAMES, SIZE, SIZE) and clip.dtype == torch.uint8
    ref = plugin.encode_videos(clip[None].float() / 127.5 - 1)[0]
    assert data[1]["vae_latent"].shape == ref.shape == (4, 2, 2, 2)
    torch.testing.assert_close(data[1]["vae_latent"], ref, rtol=2e-2, atol=2e-2)


def write_yaml(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("mode", ["data_latent", "simulate"])
def test_cli_preprocess_then_train_in_both_rollout_modes(tmp_path, videos, mode, capsys):
    data = data_config(tmp_path, videos, prompt_only=(mode == "simulate"))
    config = write_yaml(tmp_path / "run.yaml", tiny_raw(
        tmp_path / "run", data=data, training={"max_steps": 3},
        method_config={"rollout_mode": mode, "generator_update_interval": 1}))
    assert cli_main(["preprocess", str(config)]) == 0
    assert "shards ready" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "shards" / MANIFEST).read_text())
    assert manifest["fields"] == (["prompt_embeds"] if mode == "simulate" else ["prompt_embeds", "pixels"])
    assert cli_main(["train", str(config)]) == 0
    assert "trained 3 iterations" in capsys.readouterr().out


def test_simulate_reads_text_only_from_full_shards(shards):
    cfg, folder, identity = shards
    dataset = ShardDataset(LocalStore(folder), identity=identity, max_text_length=16, with_latents=False)
    assert set(dataset[3]) == {"prompt_embeds", "negative_prompt_embeds"}
    assert "pixels" not in dataset.fields


def test_data_latent_on_prompt_only_shards_is_refused_before_models_are_built(tmp_path, videos):
    cfg = tiny_config(tmp_path / "run", data=data_config(tmp_path, videos, prompt_only=True),
                      method_config={"rollout_mode": "data_latent"})
    preprocess(cfg, progress=False)
    with pytest.raises(ConfigError, match="needs 'pixels' from the data, which gives only prompt_embeds"):
        Trainer(cfg)
    # The GAN's real samples come from the data also when the student rolls out from noise.
    gan = tiny_config(tmp_path / "run", data=data_config(tmp_path, videos, prompt_only=True),
                      method_config={"rollout_mode": "simulate", "gan_critic_weight": 0.01})
    with pytest.raises(ConfigError, match=r"data.shards: method_config.gan_critic_weight: 0.01 \(the GAN's real "
                                          r"samples\) needs 'pixels'"):
        Trainer(gan)


def test_resume_after_a_bad_video_keeps_finished_shards_and_skips_them(tmp_path, videos, monkeypatch):
    good = (videos / "videos/009.mp4").read_bytes()
    (videos / "videos/009.mp4").write_bytes(b"not a video at all")  # in the last shard
    cfg = tiny_config(tmp_path / "run", data=data_config(tmp_path, videos))
    with pytest.raises(InputError, match="009.mp4: cannot decode"):
        preprocess(cfg, progress=False)
    shards = tmp_path / "shards"
    assert not (shards / MANIFEST).exists()
    written = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*")}
    assert sorted(written) == ["shard-00000.json", "shard-00000.safetensors", "shard-00001.json",
                               "shard-00001.safetensors"]

    (videos / "videos/009.mp4").write_bytes(good)
    encoded = []
    real = prep.encode_chunk
    monkeypatch.setattr(prep, "encode_chunk", lambda cfg, plugin, chunk: encoded.append(len(chunk)) or real(cfg, plugin, chunk))
    manifest = json.loads(Path(preprocess(cfg, progress=False)).read_text())
    assert encoded == [2]  # only the unfinished shard
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-0000[01]*")} == written
    assert manifest["count"] == N_VIDEOS

    # A finished folder is left as it is.
    assert preprocess(cfg, progress=False) == str(shards / MANIFEST) and encoded == [2]
    # Same result as an uninterrupted run.
    clean = tiny_config(tmp_path / "run", data=data_config(tmp_path, videos, shards=str(tmp_path / "clean")))
    clean_manifest = json.loads(Path(preprocess(clean, progress=False)).read_text())
    assert [s["sha256"] for s in clean_manifest["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_dropping_a_bad_row_reuses_the_shards_before_it(tmp_path, videos, monkeypatch):
    (videos / "videos/009.mp4").write_bytes(b"broken")
    cfg = tiny_config(tmp_path / "run", data=data_config(tmp_path, videos))
    with pytest.raises(InputError, match="009.mp4"):
        preprocess(cfg, progress=False)
    os.remove(videos / "videos/009.mp4")
    pd.read_csv(videos / "captions.csv").iloc[:9].to_csv(videos / "captions.csv", index=False)
    encoded = []
    real = prep.encode_chunk
    monkeypatch.setattr(prep, "encode_chunk", lambda cfg, plugin, chunk: encoded.append(len(chunk)) or real(cfg, plugin, chunk))
    manifest = json.loads(Path(preprocess(cfg, progress=False)).read_text())
    assert encoded == [1] and manifest["count"] == 9


def test_truncated_and_short_videos_name_the_file(tmp_path, videos):
    data = (videos / "videos/002.mp4").read_bytes()
    (videos / "videos/002.mp4").write_bytes(data[: len(data) // 3])
    cfg = tiny_config(tmp_path / "run", data=data_config(tmp_path, videos))
    with pytest.raises(InputError, match="002.mp4"):
        preprocess(cfg, progress=False)

    short = make_videos(tmp_path / "short", n=2, frames=3)
    cfg = tiny_config(tmp_path / "run", data=data_config(tmp_path, short, shards=str(tmp_path / "s2")))
    with pytest.raises(InputError, match="000.mp4: 3 frames decoded, data.num_frames needs 5"):
        preprocess(cfg, progress=False)


def test_caption_table_problems_are_found_before_encoding(tmp_path, videos, monkeypatch):
    monkeypatch.setattr(prep, "encode_chunk", lambda *a: pytest.fail("encoding started"))
    cfg = tiny_config(tmp_path / "run", data=data_config(tmp_path, videos))

    write_video(np.zeros((5, 16, 16, 3), np.uint8), videos / "videos/extra.mp4")
    with pytest.raises(InputError, match="extra.mp4: video without a caption"):
        preprocess(cfg, progress=False)
    os.remove(videos / "videos/extra.mp4")

    table = pd.read_csv(videos / "captions.csv")
    table.loc[3, "caption"] = ""
    table.to_csv(videos / "captions.csv", index=False)
    with pytest.raises(InputError, match="003.mp4: video without a caption"):
        preprocess(cfg, progress=False)

    table.loc[3, "caption"] = "fine"
    table.loc[4, "video"] = "videos/nowhere.mp4"
    table.to_csv(videos / "captions.csv", index=False)
    with pytest.raises(InputError, match="nowhere.mp4: listed in .*captions.csv but missing"):
        preprocess(cfg, progress=False)

    table.iloc[:0].to_csv(videos / "captions.csv", index=False)
    with pytest.raises(InputError, match="captions.csv: the data set is empty"):
        preprocess(cfg, progress=False)

    table.drop(columns=["caption"]).to_csv(videos / "captions.csv", index=False)
    with pytest.raises(InputError, match="missing column.*caption"):
        preprocess(cfg, progress=False)
    assert not (tmp_path / "shards").exists()


def test_a_folder_of_another_plan_is_refused_untouched(tmp_path, videos):
    cfg = tiny_config(tmp_path / "run", data=data_config(tmp_path, videos))
    preprocess(cfg, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
    other = tiny_config(tmp_path / "run", data=data_config(tmp_path, videos, height=8, width=8))
    with pytest.raises(InputError, match="holds shards made with another model or settings"):
        preprocess(other, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()} == before


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory, written_videos):
    """The shards of `written_videos`, preprocessed once for the module (nothing in them names their folder)."""
    tmp = tmp_path_factory.mktemp("preprocessed")
    cfg = tiny_config(tmp / "run", data=data_config(tmp, written_videos))
    preprocess(cfg, progress=False)
    return tmp / "shards", WanPlugin(cfg, device=torch.device("cpu")).identity()


@pytest.fixture
def shards(tmp_path, videos, preprocessed):
    """What preprocess(cfg) writes to tmp_path/shards for `videos` (a copy of `preprocessed`: the test may damage it)."""
    cfg = tiny_config(tmp_path / "run", data=data_config(tmp_path, videos))
    folder, identity = preprocessed
    shutil.copytree(folder, tmp_path / "shards")
    return cfg, tmp_path / "shards", copy.deepcopy(identity)


def test_damaged_shard_fails_naming_it_on_first_load(shards):
    cfg, folder, identity = shards
    path = folder / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    dataset = ShardDataset(LocalStore(folder), identity=identity, max_text_length=16)
    dataset[0]  # shard 0 is fine
    with pytest.raises(ShardError, match="shard-00001.safetensors: checksum differs"):
        dataset[5]

    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(ShardError, match="shard-00001.safetensors: .* bytes"):
        ShardDataset(LocalStore(folder), identity=identity, max_text_length=16)
    path.unlink()
    with pytest.raises(ShardError, match="shard-00001.safetensors: shard listed in MANIFEST.json is missing"):
        ShardDataset(LocalStore(folder), identity=identity, max_text_length=16)


def test_shard_whose_tensors_disagree_with_the_manifest(shards):
    from safetensors.torch import load_file, save_file

    from distill.data.shards import sha256_of

    cfg, folder, identity = shards
    path = folder / "shard-00002.safetensors"
    tensors = load_file(str(path))
    tensors["pixels"] = tensors["pixels"][:, :, :3].contiguous()  # 3 frames where the manifest says 5
    save_file(tensors, str(path))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["shards"][2].update(bytes=path.stat().st_size, sha256=sha256_of(path))  # checksum made to agree
    (folder / MANIFEST).write_text(json.dumps(manifest))
    dataset = ShardDataset(LocalStore(folder), identity=identity, max_text_length=16)
    with pytest.raises(ShardError, match="shard-00002.safetensors: tensors .* disagree with MANIFEST.json"):
        dataset[9]


def test_shards_of_another_model_or_size_are_refused_before_training(tmp_path, shards):
    cfg, folder, _ = shards
    raw = tiny_raw(tmp_path / "run", data={"shards": str(folder), "num_frames": FRAMES, "height": SIZE, "width": SIZE})
    other_model = tiny_config(tmp_path / "run", model={"init_seed": 7}, data=raw["data"])
    with pytest.raises(ShardError, match=r"different model.*weights: shards 'preset-encoders:\w{12}:init_seed=0', "
                                         r"run 'preset-encoders:\w{12}:init_seed=7'"):
        Trainer(other_model)
    # Shards hold what the encoders made: a preset with another transformer and the same encoders reads them.
    Trainer(tiny_config(tmp_path / "run-small", model={"preset": "small"}, data=raw["data"]))
    other_size = tiny_config(tmp_path / "run", data={**raw["data"], "height": 8, "width": 8})
    with pytest.raises(ShardError, match="asks for .*'height': 8"):
        Trainer(other_size)
    other_negative = tiny_config(tmp_path / "run", data={**raw["data"], "negative_prompt": "blurry"})
    with pytest.raises(ShardError, match="negative prompt '', but data.negative_prompt is 'blurry'"):
        Trainer(other_negative)
    (folder / MANIFEST).unlink()
    with pytest.raises(ShardError, match="no MANIFEST.json"):
        Trainer(tiny_config(tmp_path / "run", data=raw["data"]))


def test_cli_reports_input_errors(tmp_path, videos, capsys):
    (videos / "videos/001.mp4").write_bytes(b"")
    config = write_yaml(tmp_path / "run.yaml", tiny_raw(tmp_path / "run", data=data_config(tmp_path, videos)))
    assert cli_main(["preprocess", str(config)]) == 2
    err = capsys.readouterr().err
    assert "input error" in err and "001.mp4" in err


def test_prompt_only_from_inline_prompts(tmp_path):
    cfg = tiny_config(tmp_path / "run", data={"prompts": ["a", "b", "c"], "prompt_only": True,
                                              "shards": str(tmp_path / "p")})
    manifest = json.loads(Path(preprocess(cfg, progress=False)).read_text())
    assert manifest["count"] == 3 and manifest["fields"] == ["prompt_embeds"] and manifest["video"] is None
    with pytest.raises(ConfigError, match="data.videos: no videos to preprocess"):
        preprocess(tiny_config(tmp_path / "run", data={"prompts": ["a"], "shards": str(tmp_path / "q")}))


# -- the loader ------------------------------------------------------------------------------


class Numbers(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": i}


def drain(loader, batches):
    return [next(loader)["i"].tolist() for _ in range(batches)]


def test_loader_splits_ranks_shuffles_by_seed_and_resumes_exactly():
    data = Numbers(10)
    r0, r1 = (BatchLoader(data, 1, rank=r, world_size=2, seed=3) for r in (0, 1))
    epoch0 = [x for b in drain(r0, 5) for x in b], [x for b in drain(r1, 5) for x in b]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(10))  # disjoint, covering
    assert epoch0[0] != sorted(epoch0[0])  # shuffled
    assert drain(BatchLoader(data, 1, rank=0, world_size=2, seed=3), 5) == [[x] for x in epoch0[0]]
    assert drain(BatchLoader(data, 1, rank=0, world_size=2, seed=4), 5) != [[x] for x in epoch0[0]]

    a = BatchLoader(data, 3, rank=0, world_size=1, seed=0)
    drain(a, 4)  # into the second epoch
    state = a.state_dict()
    assert state["epoch"] == 1
    rest = drain(a, 5)
    b = BatchLoader(data, 3, rank=0, world_size=1, seed=0)
    b.load_state_dict(state)
    assert drain(b, 5) == rest


def test_shard_order_is_shard_local(shards):
    cfg, folder, identity = shards
    dataset = ShardDataset(LocalStore(folder), identity=identity, max_text_length=16)
    order = dataset.epoch_order(0, seed=1)
    assert sorted(order) == list(range(N_VIDEOS))
    shard_of = [dataset.locate(i)[0] for i in order]
    switches = sum(a != b for a, b in zip(shard_of, shard_of[1:]))
    assert switches == 2  # three shards, each read in one run
    assert order != dataset.epoch_order(1, seed=1)


def test_shapes_world_through_the_cli_into_training(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert cli_main(["shapes", str(out), "--count", "12", "--frames", "5", "--height", "16", "--width", "16"]) == 0
    captions = pd.read_csv(out / "captions.csv")
    assert list(captions.columns) == ["video", "caption"] and len(captions) == 12
    data = {"videos": str(out), "shards": str(tmp_path / "shards"), "num_frames": 5, "height": 16, "width": 16,
            "shard_size": 5}
    config = write_yaml(tmp_path / "run.yaml", tiny_raw(tmp_path / "run", data=data, training={"max_steps": 2},
                                                         method_config={"rollout_mode": "data_latent"}))
    assert cli_main(["preprocess", str(config)]) == 0
    assert json.loads((tmp_path / "shards" / MANIFEST).read_text())["count"] == 12
    assert cli_main(["train", str(config)]) == 0
    assert cli_main(["train", str(config), "--set", "method_config.rollout_mode=simulate",
                     "--set", f"run.output={tmp_path / 'run-simulate'}"]) == 0
    assert capsys.readouterr().out.count("trained 2 iterations") == 2


def test_shards_through_s3_preprocess_resume_train_and_damage(tmp_path, videos, s3, capsys):
    prefix = f"shards-{os.getpid()}"
    storage = {"endpoint_url": s3.endpoint, "local_dir": str(tmp_path / "work"), "retries": 2, "backoff_seconds": 0.05}
    data = data_config(tmp_path, videos, shards=f"s3://{s3.bucket}/{prefix}")
    config = write_yaml(tmp_path / "run.yaml", tiny_raw(tmp_path / "run", data=data, storage=storage,
                                                         training={"max_steps": 2},
                                                         method_config={"rollout_mode": "data_latent"}))
    assert cli_main(["preprocess", str(config)]) == 0
    client = s3.client()
    keys = sorted(o["Key"].split("/", 1)[1] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)["Contents"])
    assert keys == ["MANIFEST.json", "PLAN.json", "negative.safetensors", "shard-00000.json",
                    "shard-00000.safetensors", "shard-00001.json", "shard-00001.safetensors", "shard-00002.json",
                    "shard-00002.safetensors"]
    assert cli_main(["preprocess", str(config)]) == 0  # finished: nothing redone
    assert cli_main(["train", str(config)]) == 0
    assert "trained 2 iterations" in capsys.readouterr().out

    body = client.get_object(Bucket=s3.bucket, Key=f"{prefix}/shard-00000.safetensors")["Body"].read()
    damaged = body[:-1] + bytes([body[-1] ^ 0xFF])
    client.put_object(Bucket=s3.bucket, Key=f"{prefix}/shard-00000.safetensors", Body=damaged)
    # A full epoch reads every shard, the damaged one too.
    assert cli_main(["train", str(config), "--set", f"run.output={tmp_path / 'run2'}",
                     "--set", "training.max_steps=12"]) == 2
    assert f"s3://{s3.bucket}/{prefix}/shard-00000.safetensors: checksum differs" in capsys.readouterr().err
    # A shard of another size is found by the listing of the data set, before any is downloaded.
    client.put_object(Bucket=s3.bucket, Key=f"{prefix}/shard-00001.safetensors", Body=body[:-10])
    assert cli_main(["train", str(config), "--set", f"run.output={tmp_path / 'run3'}"]) == 2
    assert (f"s3://{s3.bucket}/{prefix}/shard-00001.safetensors: {len(body) - 10} bytes, MANIFEST.json says"
            in capsys.readouterr().err)
