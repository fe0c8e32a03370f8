"""`secateurs oneshot` end to end on a tiny local Llama with its own tokenizer: run directory,
results, the pruned model reloading without secateurs, resume of a finished run, bad input."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from secateurs.cli import main  # noqa: E402

TEXT = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7} times" for i in range(400)) + "\n"


@pytest.fixture
def model_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=fast.eos_token_id)
    d = tmp_path / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    fast.save_pretrained(d)
    (tmp_path / "calib.txt").write_text(TEXT)
    (tmp_path / "eval.txt").write_text(TEXT[::-1])
    return d


def test_oneshot_cli_writes_results_and_a_pruned_model_that_reloads(model_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["oneshot", "--model", str(model_dir), "--method", "sparsegpt", "--nm", "2:4", "--calib",
            str(tmp_path / "calib.txt"), "--eval", str(tmp_path / "eval.txt"), "--nsamples", "4", "--seqlen", "32",
            "--runs-dir", str(runs), "--no-progress"]
    assert main(argv) == 0
    (run,) = runs.iterdir()
    results = json.loads((run / "results.json").read_text())
    assert results["pattern"] == "2:4" and results["sparsity"] == 0.5 and results["perplexity_pruned"] > 1
    assert (run / "results.csv").read_text().startswith("method,pattern,sparsity")
    pruned = transformers.AutoModelForCausalLM.from_pretrained(run / "model")
    w = pruned.model.layers[0].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == 0.5
    assert main(argv) == 0  # finished: reported, not redone
    assert "already complete" in capsys.readouterr().out


def test_oneshot_cli_bad_input_is_one_line(model_dir, tmp_path, capsys):
    assert main(["oneshot", "--model", str(tmp_path / "nowhere"), "--text", "kjv"]) == 2
    assert "no config.json there" in capsys.readouterr().err
    assert main(["oneshot", "--model", str(model_dir), "--calib", str(tmp_path / "calib.txt")]) == 2
    assert "--eval FILE" in capsys.readouterr().err
    assert main(["oneshot", "--model", str(model_dir), "--nm", "2-4", "--calib", "x", "--eval", "y"]) == 2
    assert "--nm must look like 2:4" in capsys.readouterr().err
    assert main(["oneshot", "--model", str(model_dir), "--calib", str(tmp_path / "calib.txt"), "--eval",
                 str(tmp_path / "eval.txt"), "--seqlen", "100000", "--runs-dir", str(tmp_path / "r")]) == 2
    assert "not more than one sequence" in capsys.readouterr().err
