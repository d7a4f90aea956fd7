"""The batched decoding engine: one `BatchDecoder` steps every slot (a generation, a
sweep point, a server request) through one batched decode per model, mixes each slot's
logits rows in place and samples them with llama.cpp's sampler chain.

Rooms: `request` (the typed request a slot is admitted with), `decoder` (admit, step,
retire), `slots` and `kv_sequences` (per-slot state and the KV sequences it holds),
`source_decodes` (each model's decode, overlapped across threads), `mixing` (the
native hook and its numpy twin), `mixing_step` (one slot's mix and sample),
`guidance` (mixture terms, CFG), `logprobs` and `logprob_format` (what an answer
records), `outputs` (tokens to text, held back at a split character or a possible stop
string), `stream` (one generation as a stream, and its result).
"""
