"""The run directory: paths, manifests with their upstream chain, typed readers, and the one-writer lock.

Stages read their inputs and write their outputs only through this package; components know nothing of it.
"""

from mlpmem.artifacts.manifest import (FORMAT_VERSION, MANIFEST, claim, command_of, invalidate, read_manifest,  # noqa: F401
                                       rebuilding_stale, require_manifest, should_skip, verify_chain, write_manifest)
from mlpmem.artifacts.readers import (DATA, DATASTORE, DATASTORE_VAL, FINETUNE, FINETUNED_MODEL, INDEX, JOINT, JOINT_MEMORY,  # noqa
                                      MEMORY, SPLITS, TARGETS, Datastore, base_model, TargetStore, TunedSettings,
                                      check_memory_matches, is_complete, joint_model, load_eval_results,
                                      load_eval_scores, load_memory, load_offsets, load_scores, load_split,
                                      open_index, open_knn, save_scores, scores_path, tuned_settings)
