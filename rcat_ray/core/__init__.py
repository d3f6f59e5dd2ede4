"""The Ray-free method: data sources, sample sets, models, attacks, flips, losses and one fine-tuning epoch."""
