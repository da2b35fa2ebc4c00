"""Tuneforge: QLoRA fine-tuning jobs and multi-adapter LoRA serving behind one REST API."""
