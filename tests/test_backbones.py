"""The backbone families (models/backbones/): what each answers, checked by hand on tiny random models.

The causal family's shift is where errors hide: the logits that score answer token j sit one position before
it, in a row that is padded on the left. Each check here recomputes the value from one unpadded forward pass
of the whole sequence, row by row, so a batch's layout cannot agree with itself by construction.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest
import torch

from models.backbone import load_backbone
from models.backbones import FAMILIES, block_of, family_of, supported_model_types
from models.delta import DeltaConfig, attach_delta, delta_params
from models.examples import collate, encode_answers, generate, rank_scores
from tests.conftest import REPO
from utils.errors import UserInputError

PROMPTS = ["the cat sat on the mat", "a dog", "blue sky over the green hills today"]
ANSWERS = ["yes", "no no", "maybe so yes"]
SIZES = {"lora": {"lora_r": 2, "lora_alpha": 4}, "adapter": {"adapter_size": 4}, "ia3": {},
         "prefix": {"prefix_length": 3, "prefix_mlp": 8}}


def perturbed(model, method: str, seed: int = 0):
    """``model`` with a module of ``method`` whose every parameter is moved off its initial value."""
    attach_delta(model, DeltaConfig(method, **SIZES[method]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta_params(model).values():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


def encoded(tokenizer):
    return tokenizer(PROMPTS).input_ids, encode_answers(tokenizer, ANSWERS)


def alone_logits(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """The logits that predict each answer token, from the unpadded sequence prompt + answer (causal)."""
    ids = torch.tensor([prompt + answer])
    full = model(input_ids=ids).logits[0]
    return full[len(prompt) - 1:len(prompt) + len(answer) - 1]


@pytest.mark.parametrize("method", [None, "prefix", "lora"])
def test_causal_answer_logits_are_each_rows_own_next_token_logits(tiny_causal_dir, method):
    model, tok = load_backbone(tiny_causal_dir)
    if method:
        perturbed(model, method)
    prompts, answers = encoded(tok)
    batch = collate(model, prompts, answers, tok.pad_token_id)
    assert batch["labels"].shape == (3, max(map(len, answers)))
    with torch.no_grad():
        logits = family_of(model).answer_logits(model, batch)
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            expected = alone_logits(model, prompt, answer)
            assert torch.allclose(logits[i, :len(answer)], expected, atol=1e-5), i
            assert batch["labels"][i, :len(answer)].tolist() == answer
            assert (batch["labels"][i, len(answer):] == -100).all()


def test_causal_token_loss_by_hand(tiny_causal_dir):
    """The Loss metric of one answer token, from the softmax written out over the unpadded sequence."""
    from get_similarity.metrics import token_loss

    model, tok = load_backbone(tiny_causal_dir)
    prompts, answers = encoded(tok)
    batch = collate(model, prompts, answers, tok.pad_token_id)
    with torch.no_grad():
        values, mask = token_loss(family_of(model).answer_logits(model, batch), batch["labels"])
        row, j = 2, 1  # the longest prompt's second answer token
        ids = prompts[row] + answers[row]
        z = model(input_ids=torch.tensor([ids])).logits[0, len(prompts[row]) + j - 1].double()
        by_hand = -(z[ids[len(prompts[row]) + j]] - torch.log(torch.exp(z).sum()))
    assert mask.sum() == sum(map(len, answers))
    assert values[row, j].item() == pytest.approx(by_hand.item(), abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "adapter"])
def test_causal_generation_is_each_rows_greedy_continuation(tiny_causal_dir, method):
    """Left-padded batched generation equals a greedy loop over each unpadded prompt, stopping at EOS. (With the
    library's key-value cache it does not, for LoRA, (IA)³ and prefix: models/backbones/causal.py.)"""
    from models.examples import EncodedTask

    model, tok = load_backbone(tiny_causal_dir)
    perturbed(model, method)
    prompts, _ = encoded(tok)
    task = EncodedTask([None] * 3, prompts, [[[1]]] * 3)
    got = generate(model, tok, task, batch_size=3, max_new_tokens=6)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = list(prompt)
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                ids.append(nxt)
            assert got[i] == tok.decode(ids[len(prompt):], skip_special_tokens=True).strip(), i


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_rank_scores_are_summed_answer_log_probabilities(family, tiny_backbone_dir, tiny_causal_dir):
    from models.examples import EncodedTask

    folder = tiny_backbone_dir if family == "seq2seq" else tiny_causal_dir
    model, tok = load_backbone(folder)
    perturbed(model, "lora")
    prompts, _ = encoded(tok)
    labels = ["yes", "no", "maybe so"]
    scores = rank_scores(model, tok, EncodedTask([None] * 3, prompts, [[[1]]] * 3), labels, batch_size=4)
    label_ids = encode_answers(tok, labels)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for j, answer in enumerate(label_ids):
                if family == "causal":
                    logp = alone_logits(model, prompt, answer).log_softmax(-1)
                else:
                    logp = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([answer])).logits[0]
                    logp = logp.log_softmax(-1)
                expected = sum(logp[t, tok_id].item() for t, tok_id in enumerate(answer))
                assert scores[i, j].item() == pytest.approx(expected, abs=1e-4), (i, j)


def test_prefix_acts_in_a_padded_causal_batch(tiny_causal_dir):
    """AdapterHub 1.3.0's prefix is masked out under SDPA attention in a padded batch (its mask arithmetic assumes
    an additive mask); the causal family switches a prefix model to eager attention. Without the switch the
    padded row's logits would equal the bare model's."""
    bare, tok = load_backbone(tiny_causal_dir)
    model = perturbed(load_backbone(tiny_causal_dir)[0], "prefix")
    prompts, answers = encoded(tok)
    batch = collate(model, prompts, answers, tok.pad_token_id)
    with torch.no_grad():
        with_prefix = family_of(model).answer_logits(model, batch)
        without = family_of(bare).answer_logits(bare, batch)
    assert (with_prefix[1] - without[1]).abs().max() > 1e-2  # row 1 is padded on the left


def test_block_patterns_and_fingerprints_of_both_families(tiny_backbone_dir, tiny_causal_dir):
    assert block_of("encoder.block.3.layer.0.SelfAttention.q.loras.delta.lora_A") == ("encoder", 3)
    assert block_of("decoder.block.1.layer.1.EncDecAttention.v.loras.delta.lora_B") == ("decoder", 1)
    assert block_of("model.layers.7.self_attn.q_proj.loras.delta.lora_A") == ("decoder", 7)
    assert block_of("shared.weight") is None
    from models.delta import backbone_fingerprint

    t5, _ = load_backbone(tiny_backbone_dir)
    llama, _ = load_backbone(tiny_causal_dir)
    assert {k: v for k, v in backbone_fingerprint(t5).items() if k != "weights"} == {
        "d_model": 32, "num_layers": 2, "num_decoder_layers": 2, "vocab_size": t5.config.vocab_size,
        "family": "seq2seq"}
    assert {k: v for k, v in backbone_fingerprint(llama).items() if k != "weights"} == {
        "d_model": 32, "num_decoder_layers": 2, "vocab_size": llama.config.vocab_size, "family": "causal"}


@pytest.mark.parametrize("method", ["adapter", "lora", "prefix", "ia3"])
def test_every_method_builds_and_learns_on_mistral(method):
    """Mistral is listed as supported: every method attaches and its gradient reaches every delta parameter."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = perturbed(MistralForCausalLM(config), method)  # off the neutral start, where some gradients are 0
    batch = family_of(model).collate([[5, 6, 7], [8, 9]], [[3, 1], [4, 4, 1]], 0)
    family_of(model).answer_loss(model, batch).backward()
    params = delta_params(model)
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_another_architecture_is_refused_by_name(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=16).save_pretrained(tmp_path)
    with pytest.raises(UserInputError, match=r"a gpt2 model .*supported: t5, mt5, llama, mistral"):
        load_backbone(tmp_path)
    assert supported_model_types() == ("t5", "mt5", "llama", "mistral")


def test_a_method_a_family_does_not_support_is_one_line_naming_both(tiny_causal_dir, monkeypatch):
    model, _ = load_backbone(tiny_causal_dir)
    monkeypatch.setattr(FAMILIES["causal"], "unsupported_methods", ("adapter", "prefix"))
    message = r"delta method 'prefix' .* causal backbones \(llama\); supported there: lora, ia3"
    with pytest.raises(UserInputError, match=message):
        attach_delta(model, DeltaConfig("prefix", **SIZES["prefix"]))


# Names that belong to T5 alone: its classes, and what only an encoder-decoder forward takes.
T5_NAMES = re.compile(r"^(M?T5[A-Z]\w*|decoder_input_ids|encoder_outputs|prepare_decoder_input_ids_from_labels|"
                      r"get_encoder)$")
T5_FILES = {"models/backbones/seq2seq.py"}  # the family file; tests and benchmarks may build T5s themselves
SKIPPED = {".venv", ".git", "tests", "bench", "runs", "outputs", "__pycache__"}


def t5_names(path: Path, root: Path = REPO) -> list[str]:
    """The identifiers of ``path`` that name T5 (docstrings and comments may mention it)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return [f"{path.relative_to(root)}:{t.start[0]}: {t.string}" for t in tokens
            if t.type == tokenize.NAME and T5_NAMES.match(t.string)]


def test_t5_is_named_only_in_its_backbone_file():
    found = [hit for path in sorted(REPO.rglob("*.py")) if not SKIPPED & set(path.relative_to(REPO).parts[:-1])
             and str(path.relative_to(REPO)) not in T5_FILES for hit in t5_names(path)]
    assert not found, "T5 names outside models/backbones/seq2seq.py:\n" + "\n".join(found)
    assert t5_names(REPO / "models/backbones/seq2seq.py")  # the scan sees them where they are


def test_the_scan_catches_a_t5_name(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('"""T5Config in a docstring is fine."""\nfrom transformers import T5Config\n'
                       "x = dict(decoder_input_ids=1)  # T5Model in a comment too\n", encoding="utf-8")
    assert [h.split(": ")[1] for h in t5_names(planted, tmp_path)] == ["T5Config", "decoder_input_ids"]


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_each_lora_location_reaches_the_modules_the_family_table_names(family, tiny_backbone_dir, tiny_causal_dir):
    """``lora_modules`` is measured, not assumed: attach LoRA at one location at a time and read which projections
    the library wrapped (the tiny T5 has a gated feed-forward: wi_0 and wi_1)."""
    from models.methods.lora import LORA_LOCATIONS

    folder = tiny_backbone_dir if family == "seq2seq" else tiny_causal_dir
    table = FAMILIES[family].lora_modules
    for location in LORA_LOCATIONS:
        model, _ = load_backbone(folder)
        attach_delta(model, DeltaConfig("lora", lora_r=2, lora_alpha=4, lora_targets=location))
        reached = {n.split(".loras.")[0].rsplit(".", 1)[-1] for n in delta_params(model)}
        assert reached and all(table[m] == location for m in reached), (location, reached)
        expected = {m for m, loc in table.items() if loc == location and m != "wi"}  # wi: ungated T5 only
        assert reached == expected, location


@pytest.mark.parametrize("method", ["adapter", "lora", "ia3"])
def test_a_fresh_module_is_neutral_on_the_causal_backbone_and_survives_a_save(method, tiny_causal_dir, tmp_path):
    """The neutral start (the bare model's logits, exactly) and a bitwise save/load round trip, on the causal family."""
    from models.delta import backbone_fingerprint, delta_state_dict, load_delta_state, save_delta_checkpoint
    from models.formats import load_delta_checkpoint

    bare, tok = load_backbone(tiny_causal_dir)
    model, _ = load_backbone(tiny_causal_dir)
    cfg = DeltaConfig(method, **SIZES[method])
    attach_delta(model, cfg)
    prompts, answers = encoded(tok)
    batch = collate(model, prompts, answers, tok.pad_token_id)
    with torch.no_grad():  # two computations (the module adds an exact zero or scales by one): float32 tolerance
        torch.testing.assert_close(family_of(model).answer_logits(model, batch),
                                   family_of(bare).answer_logits(bare, batch), rtol=1e-6, atol=1e-6)
    g = torch.Generator().manual_seed(3)
    state = {k: v + torch.randn(v.shape, generator=g) for k, v in delta_state_dict(model).items()}
    save_delta_checkpoint(tmp_path / "ckpt", state, cfg, "tiny", backbone_fingerprint(model))
    tensors, meta = load_delta_checkpoint(tmp_path / "ckpt")
    assert meta["backbone_fingerprint"]["family"] == "causal"
    assert all(torch.equal(tensors[k], state[k]) for k in state)
    load_delta_state(model, tensors, "round trip")
    assert all(torch.equal(v, state[k]) for k, v in delta_state_dict(model).items())


def test_a_family_registered_in_one_line_runs_tune_py(tiny_causal_dir, tmp_path, monkeypatch, capsys):
    """The README's "to add a backbone family": a ``BackboneFamily`` subclass and its entry in ``FAMILIES``. Here a
    dummy family takes Mistral over from the causal family, and tune.py trains and predicts on a Mistral through it
    (and only through it: its collate is counted)."""
    import json

    from transformers import MistralConfig, MistralForCausalLM

    import tune
    from models.backbones.causal import Causal
    from tests.conftest import SUITE_DIR
    from utils.errors import run_cli

    calls = []

    class Dummy(Causal):
        name = "dummy"
        model_types = ("mistral",)

        def collate(self, inputs, labels, pad_id):
            calls.append(len(inputs))
            return super().collate(inputs, labels, pad_id)

    monkeypatch.setattr(FAMILIES["causal"], "model_types", ("llama",))
    monkeypatch.setitem(FAMILIES, "dummy", Dummy())
    folder = tmp_path / "mistral"
    vocab = json.loads((tiny_causal_dir / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1,
                                     bos_token_id=1)).save_pretrained(folder)
    for f in tiny_causal_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (folder / f.name).write_bytes(f.read_bytes())
    assert family_of(load_backbone(folder)[0]).name == "dummy"
    out = tmp_path / "out"
    code = run_cli(tune.main, ["--do_train", "--do_predict", "--tune_method", "lora", "--lora_r", "2", "--model",
                               str(folder), "--task_dir", str(SUITE_DIR), "--tasks", "sent_review", "--output_dir",
                               str(out), "--train_iters", "2", "--valid_interval", "2", "--warmup_steps", "1",
                               "--learning_rate_list", "1e-3", "--bsz_list", "4", "--max_output_length", "4",
                               "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert calls and (out / "result.tsv").is_file()


def test_fusion_on_the_causal_family_is_exact_on_delta_w(tiny_causal_dir, tmp_path):
    """The average of three causal LoRA sources, fused by the script: with ``params`` the factors' weighted sum,
    bit for bit; with ``delta_w`` (the default) each pair's B·A·alpha/r is the best rank-r approximation of the
    mean ΔW (Eckart-Young, by SVD here)."""
    import unit_model.unit_model_average as unit_model_average
    from models.delta import backbone_fingerprint, delta_state_dict, save_delta_checkpoint
    from models.formats import load_delta_checkpoint
    from utils.errors import run_cli

    model, _ = load_backbone(tiny_causal_dir)
    cfg = DeltaConfig("lora", lora_r=2, lora_alpha=4, lora_targets="q,v,output")
    attach_delta(model, cfg)
    tasks = ["sent_review", "sent_tweet", "topic_news", "topic_places"]
    theta = {}
    for i, task in enumerate(tasks):
        g = torch.Generator().manual_seed(i)
        theta[task] = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in delta_state_dict(model).items()}
        save_delta_checkpoint(tmp_path / "sources" / task, theta[task], cfg, "tiny", backbone_fingerprint(model),
                              task=task)
    common = ["--tasks", *tasks, "--source_ckpt_path", str(tmp_path / "sources")]  # sizes come from the modules
    assert run_cli(unit_model_average.main, [*common, "--save_ckpt_path", str(tmp_path / "params"),
                                             "--lora_combine", "params"]) == 0
    assert run_cli(unit_model_average.main, [*common, "--save_ckpt_path", str(tmp_path / "dw")]) == 0
    target, others = tasks[0], tasks[1:]
    fused, meta = load_delta_checkpoint(tmp_path / "params" / f"without_{target}")
    assert meta["sizes"]["lora_targets"] == "q,v,output" and any(".up_proj." in k for k in fused)
    for k, value in fused.items():
        expected = torch.zeros(value.shape, dtype=torch.float64)
        for s in others:
            expected.add_(theta[s][k].double(), alpha=1 / 3)
        assert torch.equal(value, expected.float()), k
    fused, _ = load_delta_checkpoint(tmp_path / "dw" / f"without_{target}")
    for ka in [k for k in fused if k.endswith("lora_A")]:
        kb = ka[:-len("lora_A")] + "lora_B"
        mean = sum(theta[s][kb].double() @ theta[s][ka].double() for s in others) / 3 * 2.0  # alpha / r = 2
        u, sv, vh = torch.linalg.svd(mean)
        best = u[:, :2] @ torch.diag(sv[:2]) @ vh[:2]
        torch.testing.assert_close(fused[kb].double() @ fused[ka].double() * 2.0, best, rtol=1e-4, atol=1e-5)


def test_another_models_tokenizer_on_the_causal_backbone_is_one_line_and_writes_nothing(tiny_causal_dir, tmp_path,
                                                                                        capsys):
    import tune
    from tests.conftest import DEFAULT_MODEL_DIR, SUITE_DIR
    from utils.errors import run_cli

    out = tmp_path / "out"
    code = run_cli(tune.main, ["--do_train", "--tune_method", "lora", "--model", str(tiny_causal_dir),
                               "--tokenizer_path", str(DEFAULT_MODEL_DIR), "--task_dir", str(SUITE_DIR), "--tasks",
                               "sent_review", "--output_dir", str(out), "--train_iters", "2", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "the tokenizer and the model do not belong together" in err[0]
    assert "--tokenizer_path" in err[0] and not out.exists()


def test_importance_on_the_causal_family_groups_its_layers_and_pools_answer_tokens(tiny_causal_dir, tmp_path):
    """importance.py on a causal LoRA: one stack (block ``decoder``), its layers, and the full module's dev loss
    equal to the Loss metric pooled over the answer tokens by hand (log-softmax of the unpadded sequence)."""
    import csv

    from get_similarity import importance
    from models.delta import backbone_fingerprint, delta_state_dict, save_delta_checkpoint
    from tests.conftest import SUITE_DIR

    model, tok = load_backbone(tiny_causal_dir)
    perturbed(model, "lora")
    cfg = DeltaConfig("lora", **SIZES["lora"])
    save_delta_checkpoint(tmp_path / "ckpt", delta_state_dict(model), cfg, "tiny", backbone_fingerprint(model),
                          task="sent_review")
    out = tmp_path / "out"
    assert importance.main(["--checkpoint", str(tmp_path / "ckpt"), "--task", "sent_review", "--model",
                            str(tiny_causal_dir), "--task_dir", str(SUITE_DIR), "--max_output_length", "4",
                            "--batch_size", "4", "--output_dir", str(out), "--device", "cpu", "--quiet"]) == 0
    with open(out / "importance.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert {r["group"] for r in rows if r["granularity"] == "block"} == {"decoder"}
    assert {r["group"] for r in rows if r["granularity"] == "layer"} == {"decoder.0", "decoder.1"}
    from dataloader.crossfit import load_task
    from models.examples import encode_examples

    task = encode_examples(tok, load_task(SUITE_DIR, "sent_review", 16, 100, ["dev"])["dev"], 256, 4)
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, outputs in zip(task.inputs, task.outputs):
            logp = alone_logits(model, prompt, outputs[0]).double().log_softmax(-1)
            total -= sum(logp[j, t].item() for j, t in enumerate(outputs[0]))
            count += len(outputs[0])
    full = rows[0]
    assert (full["granularity"], full["group"]) == ("model", "full")
    assert float(full["dev_loss"]) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("model,output,library", [
    ("models/default", "runs/demo", "models/default-sources/lora"),
    ("models/default-causal/", "runs/demo-causal", "models/default-causal-sources/lora"),
])
def test_make_demo_runs_the_study_of_its_model_with_that_models_library(model, output, library):
    import subprocess

    done = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": "echo", "MODEL": model})
    command = done.stdout.splitlines()[0].split()  # PYTHON=echo: pipeline.sh prints the study's command
    flags = {command[i]: command[i + 1] for i in range(1, len(command) - 1) if command[i].startswith("--")}
    assert (flags["--model"], flags["--output"], flags["--source_library"]) == (model.rstrip("/"), output, library)


def test_make_demo_refuses_a_model_without_a_committed_library():
    import subprocess

    done = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": "echo", "MODEL": "models/elsewhere"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "MODEL=models/elsewhere" in done.stderr
