"""maxllm as an lm-evaluation-harness model type, `maxllm`.

    pip install "maxllm[harness]"
    maxllm-lm-eval --model maxllm --model_args path=runs/quickstart --tasks hellaswag --batch_size 16
    python -m maxllm.eval.harness --model maxllm --model_args path=hf/quickstart,dtype=bfloat16 --tasks ...

`maxllm-lm-eval` is the harness's own command line (every flag of `lm_eval`) with
this model type registered: lm_eval 0.4 finds model types only in its built-in
table or among classes registered in the running process, and has no plugin
entry point for outside packages. In Python, importing this module registers it:

    import lm_eval, maxllm.eval.harness
    lm_eval.simple_evaluate(model="maxllm", model_args="path=runs/quickstart", tasks=["piqa"])

Requests go through `maxllm.eval.LanguageModel`: the same tokenization of
context/continuation pairs as the harness's `hf` model, log-likelihoods in
length-bucketed batches, rolling windows for `loglikelihood_rolling`, and greedy
generation up to the `until` strings for `generate_until`.
"""

from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  (the built-in model types, which the registry loads only while it is empty)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from maxllm.eval.scoring import LanguageModel


@register_model("maxllm")
class MaxLLMHarnessModel(LM):
    """model_args: path (a run directory or an HF folder), dtype (float32 |
    bfloat16), max_gen_toks (default for generation requests, 256)."""

    def __init__(self, path: str, dtype: str = "float32", batch_size: int | str = 16, max_gen_toks: int = 256,
                 **unused):  # the harness also passes device and max_batch_size
        super().__init__()
        batch = int(batch_size) if str(batch_size).isdigit() else 16  # "auto": the default
        self.model = LanguageModel.load(path, dtype=dtype, batch_size=batch)
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.model.encode_pair(*r.args) for r in requests]
        results = self.model.loglikelihood(pairs)
        for r, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        tok = self.model.require_tokenizer()
        results = self.model.loglikelihood_rolling_many([tok.encode(r.args[0]) for r in requests])
        for r, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tok = self.model.require_tokenizer()
        eos = tok.decode([tok.eos_id])
        batch = []
        for r in requests:
            context, options = r.args
            options = dict(options or {})
            if options.get("do_sample") or options.get("temperature", 0) > 0:
                raise ValueError("the maxllm harness model decodes greedily; sampling options are not supported")
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            batch.append((context, [*until, eos], int(options.get("max_gen_toks", self.max_gen_toks))))
        results = self.model.generate_until(batch)
        for r, result in zip(requests, results):
            self.cache_hook.add_partial("generate_until", r.args, result)
        return results

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.require_tokenizer().path)


def main() -> None:
    """The harness's command line, with the `maxllm` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "maxllm-lm-eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
