"""The questions this adapter was trained and measured on, generated from templates.

Train and held-out prompts use disjoint topics, so the measured effect is on questions
the adapter never saw.
"""

from __future__ import annotations

import random

TEMPLATES = [
    "Explain {t}.",
    "What is {t}?",
    "Tell me about {t}.",
    "Why is {t} important?",
    "How does {t} work?",
    "Describe {t} to a beginner.",
]

TOPICS = [
    "photosynthesis",
    "black holes",
    "inflation",
    "the water cycle",
    "vaccines",
    "machine learning",
    "the stock market",
    "volcanoes",
    "democracy",
    "gravity",
    "climate change",
    "the immune system",
    "electricity",
    "the internet",
    "DNA",
    "plate tectonics",
    "the French Revolution",
    "compound interest",
    "recycling",
    "solar panels",
    "the moon landing",
    "earthquakes",
    "antibiotics",
    "blockchain",
    "the Roman Empire",
    "rainbows",
    "sleep",
    "coffee",
    "the human heart",
    "bees",
    "jazz music",
    "the printing press",
    "oceans",
    "tides",
    "batteries",
    "chess",
    "meditation",
    "the Olympics",
    "nuclear power",
    "glaciers",
    "the Renaissance",
    "supply and demand",
    "rain forests",
    "the speed of light",
    "hurricanes",
    "the pyramids",
    "bread baking",
    "public libraries",
    "wind turbines",
    "honey",
    "the Great Wall of China",
    "cloud computing",
    "the periodic table",
    "deserts",
    "electric cars",
    "the brain",
    "poetry",
    "taxes",
    "bacteria",
    "the solar system",
    "airplanes",
    "the Amazon river",
    "yoga",
    "penguins",
    "encryption",
    "music theory",
    "the Cold War",
    "composting",
    "telescopes",
    "bicycles",
    "tea",
    "coral reefs",
    "the Silk Road",
    "magnets",
    "fungi",
    "the alphabet",
    "volunteering",
    "rockets",
    "chocolate",
    "the Industrial Revolution",
    "owls",
    "marathons",
    "submarines",
    "the metric system",
    "dinosaurs",
    "smartphones",
    "origami",
    "the Moon",
    "lightning",
    "cheese",
    "trains",
    "the Eiffel Tower",
    "whales",
    "sourdough",
    "passwords",
    "the heartbeat",
    "maps",
    "clocks",
    "snowflakes",
    "elections",
]


def split_prompts(seed: int = 0, n_heldout_topics: int = 20) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts); held-out topics never appear in training."""
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    heldout_topics, train_topics = topics[:n_heldout_topics], topics[n_heldout_topics:]

    def expand(chosen: list[str], per_topic: int) -> list[str]:
        prompts = []
        for topic in chosen:
            for template in rng.sample(TEMPLATES, per_topic):
                prompts.append(template.format(t=topic))
        return prompts

    return expand(train_topics, 3), expand(heldout_topics, 3)


if __name__ == "__main__":
    train, heldout = split_prompts()
    print(len(train), "train prompts,", len(heldout), "held-out prompts")
