"""Issue 19: hub-cache downloads load; hostile or damaged model files and configs fail fast with a ValueError
naming the file; full disks and kills during pruning leave nothing that looks complete and explain
themselves in one line; a torn metrics line does not block --resume."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import llama3
from llama3.checkpoint import native
from llama3.checkpoint.safety import WriteFailed, os_error_of
from llama3.config import ModelArgs
from llama3.train.metrics import MetricsWriter
from tests.conftest import REPO, random_model, tiny_args
from tests.test_checkpoint_hf import byte_tokenizer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args("gqa", vocab_size=512), seed=21)


@pytest.fixture(scope="module")
def hf_sharded(model, tmp_path_factory):
    return llama3.save(model, byte_tokenizer(), tmp_path_factory.mktemp("hf") / "model", format="hf",
                       max_shard_size="60KB")


def _logits(model, tokens=((1, 2, 3, 4, 5, 6, 7),)):
    with torch.no_grad():
        return model(torch.tensor(tokens))


# ----- item 2: the Hugging Face hub cache -----

def _hub_cache(folder: Path, root: Path) -> Path:
    """The hub's layout: every file of snapshots/<rev>/ is a relative link to ../../blobs/<hash>."""
    repo = root / "hub" / "models--acme--tiny-llama3"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(folder.iterdir())):
        assert path.is_file()
        blob = blobs / f"{i:040x}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


def test_hub_cache_snapshot_with_sharded_safetensors_loads(model, hf_sharded, tmp_path):
    assert len(list(hf_sharded.glob("model-*.safetensors"))) > 1  # the case that was refused
    snapshot = _hub_cache(hf_sharded, tmp_path)
    assert all(p.is_symlink() for p in snapshot.iterdir())
    loaded, tokenizer = llama3.load(snapshot)
    assert torch.equal(_logits(loaded), _logits(model))
    assert tokenizer.n_words == byte_tokenizer().n_words


def test_hub_cache_path_with_tilde_loads(model, hf_sharded, tmp_path, monkeypatch):
    home = tmp_path / "home"
    snapshot = _hub_cache(hf_sharded, home / ".cache" / "huggingface")
    monkeypatch.setenv("HOME", str(home))
    loaded, _ = llama3.load("~/" + str(snapshot.relative_to(home)))
    assert torch.equal(_logits(loaded), _logits(model))


@pytest.mark.parametrize("name", ["../blobs/x.safetensors", "a/../../x.safetensors", "/etc/passwd", "C:\\x",
                                  "a\\..\\x"])
def test_shard_names_that_leave_the_folder_are_still_refused(hf_sharded, tmp_path, name):
    snapshot = _hub_cache(hf_sharded, tmp_path)
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = name
    (snapshot / "model.safetensors.index.json").unlink()
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="refusing file name"):
        llama3.load(snapshot)


# ----- items 5 and 9: absurd or non-finite configs -----

def _with_config(folder: Path, tmp_path: Path, **changes) -> Path:
    copy = shutil.copytree(folder, tmp_path / "edited")
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))  # NaN / Infinity written as JSON allows them
    return copy


def test_a_million_layers_fail_against_the_tensor_names_before_building(hf_sharded, tmp_path, monkeypatch):
    import llama3.model

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked against the weights")

    monkeypatch.setattr(llama3.model.Transformer, "__init__", never)
    folder = _with_config(hf_sharded, tmp_path, num_hidden_layers=10**6)
    with pytest.raises(ValueError, match="declares 1000000 layers but the weights hold 2"):
        llama3.load(folder)


def test_a_huge_vocabulary_fails_against_the_tensor_shapes(hf_sharded, tmp_path):
    folder = _with_config(hf_sharded, tmp_path, vocab_size=30_000_000)
    with pytest.raises(ValueError, match=r"(embed_tokens|lm_head)\.weight' has shape \[512, 64\] but the config "
                                         r"implies \[30000000, 64\]"):
        llama3.load(folder)


@pytest.mark.parametrize("changes,message", [
    (dict(max_position_embeddings=10**9), "max_seq_len=1000000000 is over the limit"),
    (dict(hidden_size=2**31, num_attention_heads=4, head_dim=2**29), "RoPE table"),
    (dict(rope_theta=float("nan")), "rope_theta must be a finite number"),
    (dict(rms_norm_eps=float("inf")), "norm_eps must be a finite number"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": float("nan"), "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     "rope_scaling_factor must be a finite number"),
])
def test_absurd_or_non_finite_config_values_are_a_value_error_naming_config_json(hf_sharded, tmp_path, changes,
                                                                                   message):
    folder = _with_config(hf_sharded, tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as info:
        llama3.load(folder)
    assert "config.json" in str(info.value)


def test_model_args_limits():
    assert ModelArgs(**{**tiny_args().to_dict(), "max_seq_len": 131072}).max_seq_len == 131072
    with pytest.raises(ValueError, match="finite"):
        ModelArgs(dim=64, n_layers=2, n_heads=4, ffn_dim_multiplier=float("inf"))


# ----- item 7: training checkpoints -----

@pytest.fixture()
def step_dir(model, tmp_path) -> Path:
    return native.save_training_checkpoint(tmp_path / "run", 3, model=model, optimizer=None,
                                           train_state={"step": 3}, config_json="{}",
                                           tokenizer=byte_tokenizer())


def test_training_checkpoint_loads_equal(model, step_dir):
    loaded, _ = llama3.load(step_dir)
    assert torch.equal(_logits(loaded), _logits(model))


def test_truncated_training_weights(step_dir):
    weights = step_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        llama3.load(step_dir)


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]", '{"dim": "x", "n_layers": 2}', '{"bogus": 1}'])
def test_missing_or_corrupt_model_args_json(step_dir, content):
    path = step_dir / "model_args.json"
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=r"model_args\.json"):
        llama3.load(step_dir)


def test_model_args_that_do_not_match_the_weights(step_dir):
    path = step_dir / "model_args.json"
    args = json.loads(path.read_text())
    path.write_text(json.dumps({**args, "dim": 128}))
    with pytest.raises(ValueError, match=r"step-00000003: tensor '.*' has shape \[.*\] but the config implies"):
        llama3.load(step_dir)


def test_huge_vocab_in_model_args_fails_before_allocating(step_dir):
    path = step_dir / "model_args.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "vocab_size": 30_000_000}))
    with pytest.raises(ValueError, match=r"(tok_embeddings|output)\.weight' has shape \[512, 64\] but the config "
                                         r"implies \[30000000, 64\]"):
        llama3.load(step_dir)


def test_integer_weights_are_refused(step_dir):
    weights = step_dir / "model.safetensors"
    state = load_file(str(weights))
    state["norm.weight"] = state["norm.weight"].to(torch.int32)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'norm.weight' holds int32"):
        llama3.load(step_dir)


def test_resume_into_a_model_of_other_dims_names_the_file(step_dir):
    other = random_model(tiny_args("gqa", vocab_size=512, dim=128), seed=1)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor '.*' has shape"):
        native.load_train_state(step_dir, other, None)


# ----- item 10: pruning and full disks -----

def test_pruning_removes_the_marker_before_the_files(model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    save = dict(model=model, optimizer=None, config_json="{}", tokenizer=byte_tokenizer(), keep=1)
    native.save_training_checkpoint(run, 1, train_state={"step": 1}, **save)
    seen = []
    real_rmtree = shutil.rmtree

    def killed_during_rmtree(path, *args, **kwargs):
        seen.append((Path(path).name, (Path(path) / native.MARKER).exists()))
        (Path(path) / "model.safetensors").unlink()  # part of the folder is gone when the kill lands
        raise KeyboardInterrupt

    monkeypatch.setattr(native.shutil, "rmtree", killed_during_rmtree)
    with pytest.raises(KeyboardInterrupt):
        native.save_training_checkpoint(run, 2, train_state={"step": 2}, **save)
    monkeypatch.setattr(native.shutil, "rmtree", real_rmtree)
    assert seen == [("step-00000001", False)]
    assert [p.name for p in native.complete_checkpoints(run)] == ["step-00000002"]
    assert llama3.load(run)[0] is not None  # the newest complete checkpoint loads


def test_os_error_is_found_behind_library_exceptions():
    class SafetensorLike(Exception):
        pass

    found = os_error_of(SafetensorLike("Error while serializing: I/O error: No space left (os error 28)"), "/x")
    assert found.errno == errno.ENOSPC and found.filename == "/x"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None
    except RuntimeError as e:
        assert os_error_of(e).errno == errno.ENOSPC
    assert os_error_of(RuntimeError("a bug")) is None
    message = str(WriteFailed.from_os_error(OSError(errno.ENOSPC, "No space left on device", "/r/f"), "metrics",
                                            training=True, last_checkpoint="/r/step-00000004"))
    assert message.count("\n") == 0 and "/r/f" in message and "No space left on device" in message
    assert "/r/step-00000004" in message


FULL_DISK = """
import resource, signal, sys
from llama3.checkpoint import native
save, calls = native.save_training_checkpoint, [0]
def save_on_a_full_disk(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:  # the first checkpoint is written; from the second on the disk is full
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    return save(*args, **kwargs)
native.save_training_checkpoint = save_on_a_full_disk
from llama3.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
def test_full_disk_during_a_save_is_one_line_naming_the_last_checkpoint(tmp_path):
    """A real write failure (a file-size limit makes every write past 4 KB fail like a full disk) inside
    safetensors and torch.save: the run stops with one line, nothing half-written stays behind."""
    from tests.test_train_resume import ARGS

    data = _dataset(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", FULL_DISK, "pretrain", "--data", str(data), "--out", str(out), *ARGS]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280, check=False,
                          env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("llama3 pretrain: error")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "File too large" in lines[0] and "step-00000008" in lines[0] and "step-00000004" in lines[0]
    assert [p.name for p in native.complete_checkpoints(out)] == ["step-00000004"]
    assert not list(out.glob(".tmp-step-*"))  # the failed save gave its space back


def _dataset(tmp_path: Path) -> Path:
    from llama3.bpe import train_tokenizer
    from llama3.data.pretrain import prepare_dataset
    from tests.conftest import AUSTEN

    corpus = [AUSTEN / "persuasion.txt"]
    train_tokenizer(corpus, 512, tmp_path / "tok", num_workers=1, progress=False)
    prepare_dataset(corpus, tmp_path / "data", tmp_path / "tok" / "tokenizer.model", num_workers=1, progress=False)
    return tmp_path / "data"


def test_convert_onto_a_full_disk_is_one_line(hf_sharded, tmp_path, monkeypatch, capsys):
    from llama3.cli.convert import main

    def full(tensors, filename, metadata=None):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    assert main([str(hf_sharded), str(tmp_path / "out"), "--to", "hf"]) == 1
    err = capsys.readouterr().err
    tag = "llama3 convert: error"  # may follow an unfinished progress bar on the same line
    [line] = [line[line.index(tag):] for line in err.splitlines() if tag in line]
    assert "No space left on device" in line and str(tmp_path / "out") in line and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


# ----- item 3: a torn metrics line -----

def _metrics_file(tmp_path: Path, lines: list[str]) -> Path:
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return tmp_path


def test_a_torn_last_metrics_line_is_dropped_with_a_notice(tmp_path):
    records = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    out = _metrics_file(tmp_path, [*records, '{"step": 5, "lo'])
    notices = []
    writer = MetricsWriter(out, resume_step=3, tensorboard=False, log=notices.append)
    writer.write({"step": 4, "loss": 0.5})
    writer.close()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert len(notices) == 1 and "metrics.jsonl" in notices[0] and "line 5" in notices[0]


def test_a_bad_metrics_line_before_the_end_is_an_error_naming_the_file(tmp_path):
    out = _metrics_file(tmp_path, ['{"step": 1}', "garbage", '{"step": 2}'])
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not a metrics record"):
        MetricsWriter(out, resume_step=2, tensorboard=False)


# ----- item 8: GGUF -----

@pytest.fixture(scope="module")
def gguf_file(model, tmp_path_factory) -> Path:
    return llama3.save(model, byte_tokenizer(), tmp_path_factory.mktemp("gguf") / "m.gguf", format="gguf",
                       dtype="f32")


def _gguf_layout(data: bytes) -> dict:
    """Byte positions in a GGUF file: each metadata key's value, each tensor's offset field."""
    pos = 0

    def take(fmt):
        nonlocal pos
        value = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return data[pos - n:pos].decode("utf-8", "replace")  # token texts need not be UTF-8

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip(kind):
        nonlocal pos
        if kind == 8:
            string()
        elif kind == 9:
            item, count = take("IQ")
            for _ in range(count):
                skip(item)
        else:
            pos += sizes[kind]

    pos = 8
    n_tensors, n_fields = take("QQ")
    fields, tensors = {}, {}
    for _ in range(n_fields):
        key = string()
        kind = take("I")
        fields[key] = (kind, pos)
        skip(kind)
    for _ in range(n_tensors):
        name = string()
        n_dims = take("I")
        pos += 8 * n_dims
        take("I")  # the tensor type
        tensors[name] = (pos, take("Q"))  # (where the offset is written, the offset)
    return {"fields": fields, "tensors": tensors}


def _mutated(gguf_file: Path, tmp_path: Path, mutate) -> Path:
    data = bytearray(gguf_file.read_bytes())
    mutate(data, _gguf_layout(bytes(data)))
    out = tmp_path / "mutated.gguf"
    out.write_bytes(bytes(data))
    return out


def _rename(data: bytearray, old: bytes, new: bytes) -> None:
    assert len(old) == len(new) and data.count(old) == 1
    at = data.index(old)
    data[at:at + len(old)] = new


def test_gguf_round_trip(model, gguf_file):
    loaded, _ = llama3.load(gguf_file)
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-5)


@pytest.mark.parametrize("mutate,message", [
    (lambda d, lay: _rename(d, b"token_embd.weight", b"token_embX.weight"), "no token_embd.weight tensor"),
    (lambda d, lay: _rename(d, b"tokenizer.ggml.token_type", b"tokenizer.ggml.token_typX"),
     "tokenizer.ggml.token_type must list one type per token"),
    (lambda d, lay: struct.pack_into("<I", d, lay["fields"]["llama.context_length"][1], 1),
     "llama.context_length is 1"),
])
def test_gguf_missing_or_bad_required_parts(gguf_file, tmp_path, mutate, message):
    with pytest.raises(ValueError, match=message):
        llama3.load(_mutated(gguf_file, tmp_path, mutate))


def _move_tensor(name: str, delta: int):
    def mutate(data, layout):
        where, offset = layout["tensors"][name]
        struct.pack_into("<Q", data, where, offset + delta)
    return mutate


def _second_tensor(gguf_file: Path) -> str:
    return list(_gguf_layout(gguf_file.read_bytes())["tensors"])[1]


@pytest.mark.parametrize("delta,message", [(4, "not a multiple of the alignment"), (-32, "overlaps"),
                                           (32, "must be contiguous")])
def test_gguf_offsets_misaligned_overlapping_or_with_gaps_are_refused(gguf_file, tmp_path, delta, message):
    with pytest.raises(ValueError, match=message):
        llama3.load(_mutated(gguf_file, tmp_path, _move_tensor(_second_tensor(gguf_file), delta)))


def test_gguf_matches_the_gguf_package_on_offsets(gguf_file):
    """Our reader's layout check accepts what gguf's own writer produced, tensor for tensor."""
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    ours = _gguf_layout(gguf_file.read_bytes())["tensors"]
    assert {t.name: int(t.data_offset) - int(reader.data_offset) for t in reader.tensors} == \
        {name: offset for name, (_, offset) in ours.items()}
    assert np.isfinite(np.asarray(reader.tensors[0].data)).all()


def test_a_failed_metrics_write_is_one_line_naming_the_last_checkpoint(tmp_path):
    from llama3.train.loop import _write_record

    class FullDisk:
        path = tmp_path / "metrics.jsonl"

        def write(self, record):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteFailed) as info:
        _write_record(FullDisk(), {"step": 9}, tmp_path / "step-00000008")
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "metrics.jsonl"))
    assert "No space left on device" in message and "step-00000008" in message and "metrics of step 9" in message
