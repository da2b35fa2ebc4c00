"""Tuneforge training worker: claims fine-tuning jobs from the database and runs the QLoRA pipeline."""
