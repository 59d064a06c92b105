"""MR-MedSeg conversation data, and the synthetic anatomy and dialogue generator that writes splits in that format.

Public API (import from the submodules; this package imports nothing heavy itself):
  mrmedseg:  Conversation, DialogueRound, read_conversations(json_path, root=None, check=True),
             write_conversations(conversations, json_path, single=False)
  dataset:   Sample, MRMedSegDataset(folder, json_path=None), collate_samples(samples)
  anatomy:   generate_slice(region, seed, ...), generate_volume(region, seed, ...), AnatomySlice, Instance
  dialogues: generate_dialogue(slice, n_rounds, seed, policy), DialoguePolicy
  splits:    SPLITS, build_split(name, out_dir, n_dialogues, seed), iter_training_samples(seed),
             long_dialogue(seed, n_rounds=20), split_statistics(folder)
  demo:      bundled_demo_paths()
  contact_sheet: contact_sheet(samples, out_path)
See docs/data.md.
"""
