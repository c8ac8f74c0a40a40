"""Model plugins. A family is one module here and one registration line below.

Families are registered by path: the plugin's module (and its model library) is imported only
when a plugin is built, never when a config is loaded.
"""

from distill.registry import register_model

register_model("wan", "distill.models.wan:WanPlugin", num_train_timesteps=1000,
               presets=("tiny", "small", "shapes", "wan2.1-1.3b"))
