"""The batch config: a YAML file that says which models, prompts and analyses to run.

Why a schema of our own instead of "whatever YAML parses": a typo (``coeficients``) or a
string where a number belongs would otherwise surface as a crash minutes into a run, or worse
be silently ignored. :func:`load_config` rejects unknown keys and wrong types up front with a
:class:`~core.errors.ConfigError` whose message names the key path, e.g.
``steering.coefficients[2]: expected a number, got 'abc'``.

:meth:`Config.to_dict` writes back a dict that :func:`config_from_dict` turns into an equal
:class:`Config`, so the app can export the exact config of an analysis and the batch runner
reruns it. Every key has a default; the smallest valid config is ``{}`` (the embedded model with
the prompted-refusal preamble on the built-in prompts).

Relative file paths (prompt files, pair files, model folders written as ``./x`` or ``../x``)
are resolved against the config file's folder, so a config travels with its data.

Example (all keys)::

    models:
      - {name: smollm2-prompted, source: embedded, preamble: prompted-refusal, dtype: auto}
    prompts: {harmful: builtin:harmful, harmless: builtin:harmless, harmful_test: null,
              harmless_test: null, n_train: 64, n_test: 40, seed: 0, validation_fraction: 0.25}
    position: last                  # last | mean | a negative int (-2 = second-to-last token)
    generation: {max_new_tokens: 48, batch_size: 16, n_samples: 4}
    steering: {layer: auto, coefficients: [0.25, 0.5, 0.75, 1.0], subtract_coefficients: [0.5],
               normalised: true, method: diff-in-means, scan_prompts: 16, scan_stride: 1}
    patching: {pairs: builtin:pairs, n_pairs: 20, sites: [resid, attn, mlp], threshold: 0.1,
               pair_filter: relative, min_gap: 0.0, fdr: 0.05}
    probe: {folds: 5}
    judge: substring                # or llm:<model source>: a chat model labels each answer
    selection: {enabled: true, positions: 2, layer_stride: 4, n_prompts: 32, max_kl: 0.1,
                skip_last_fraction: 0.2, prune: true}
"""

from core.config.parse import load_config, resolve_prompts
from core.config.schema import (DEFAULT_COEFFICIENTS, DEFAULT_SUBTRACT_COEFFICIENTS, DTYPES, METHODS, POSITIONS, SITES, Config,
                                GenerationConfig, ModelSpec, PatchingConfig, ProbeConfig, PromptData, PromptsConfig,
                                SelectionConfig, SteeringConfig, dump_yaml)
from core.config.validate import TOP_KEYS, config_from_dict

__all__ = [
    "DEFAULT_COEFFICIENTS", "DEFAULT_SUBTRACT_COEFFICIENTS", "DTYPES", "METHODS", "POSITIONS", "SITES", "TOP_KEYS", "Config",
    "GenerationConfig", "ModelSpec", "PatchingConfig", "ProbeConfig", "PromptData", "PromptsConfig", "SelectionConfig",
    "SteeringConfig", "config_from_dict", "dump_yaml", "load_config", "resolve_prompts",
]
