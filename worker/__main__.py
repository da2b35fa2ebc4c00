from app.core.settings import get_settings
from worker.loop import run_worker

run_worker(get_settings())
