"""Texts the server calibrates post-hoc output ranges on, once at startup (built-in list or a file)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CALIBRATION_TEXTS: tuple[str, ...] = (
    "A cat is sleeping on the sofa.",
    "A kitten naps on the couch in the afternoon sun.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Ternary weights make language models cheap to run on a laptop.",
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "How do I reset my password if I no longer have access to my email?",
    "Click 'Forgot password' on the login page and follow the link we send you.",
    "The river Thames flows through London before reaching the North Sea.",
    "Mitochondria produce most of the chemical energy needed by a cell.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The patient was given 500 mg of amoxicillin three times a day for a week.",
    "Vaccination reduced the incidence of measles by more than ninety percent.",
    "The court ruled that the contract was void because one party had been misled.",
    "Tenants must give at least one month's written notice before leaving the flat.",
    "Preheat the oven to 180 degrees and bake the bread for forty minutes.",
    "Add a pinch of salt, two eggs and a cup of flour, then whisk until smooth.",
    "The home team scored twice in the final ten minutes to win the cup.",
    "She finished the marathon in just under three hours, a personal best.",
    "def add(a, b):\n    return a + b",
    "SELECT name, email FROM users WHERE created_at > '2020-01-01' ORDER BY name;",
    "The function raises a ValueError when the input list is empty.",
    "Install the package with pip and import it in your Python script.",
    "GPU memory usage grows with the batch size and the sequence length.",
    "Quantum computers use qubits that can be in a superposition of states.",
    "The Great Wall of China was built over many centuries by several dynasties.",
    "World War II ended in 1945 after the surrender of Germany and Japan.",
    "The novel tells the story of a young woman who moves to the city to become a painter.",
    "Beethoven composed his ninth symphony while he was almost completely deaf.",
    "Our quarterly revenue grew by twelve percent compared with last year.",
    "The meeting has been moved to Thursday at 3 pm in room 204.",
    "Thanks for your order! Your package will arrive within three to five business days.",
    "I was charged twice for the same subscription, can you refund one payment?",
    "The hotel room was clean but the breakfast was disappointing.",
    "Best budget laptop for programming and light gaming",
    "cheap flights from berlin to lisbon in may",
    "symptoms of vitamin d deficiency",
    "how long does it take to boil an egg",
    "Heavy rain and strong winds are expected along the coast tonight.",
    "Global average temperatures have risen by about 1.1 degrees since pre-industrial times.",
    "The new train line cuts the journey between the two cities to under an hour.",
    "Electric cars are cheaper to maintain but still more expensive to buy.",
    "The museum's collection includes paintings from the Renaissance to the present day.",
    "A triangle with sides of 3, 4 and 5 centimetres is a right triangle.",
    "The derivative of sin(x) is cos(x).",
    "Large language models are trained to predict the next token of a text.",
    "Embeddings map sentences to vectors so that similar meanings are close together.",
    "Der Zug nach München fährt um acht Uhr vom Hauptbahnhof ab.",
    "Le musée est fermé le lundi et ouvert de dix heures à dix-huit heures.",
    "El gobierno anunció nuevas medidas para reducir el precio de la energía.",
    "La pizza margherita è nata a Napoli alla fine dell'Ottocento.",
    "東京は日本の首都で、世界最大級の都市圏の一つです。",
    "Yes.",
    "No, thank you.",
    "Error 404: page not found.",
    "The dog barked at the mail carrier every morning.",
    "Two men are playing chess in the park.",
    "A woman is slicing an onion in the kitchen.",
    "A man is playing a guitar on stage.",
    "Children are running on the beach at sunset.",
    "The committee rejected the proposal by a narrow margin.",
    "Researchers found no significant difference between the two treatments.",
    "Please summarise the attached report in three bullet points.",
    "Translate the following sentence into Spanish: the weather is nice today.",
)
"""Built-in calibration texts (varied domains, lengths, queries and documents, a few languages). Calibrating on
the traffic you serve (``--calibration-texts``) gives tighter low-bit ranges."""


def read_calibration_texts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (one text per line).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file holds fewer than 2 non-empty lines (no per-dimension range can be measured).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration texts file not found: {path}")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(texts) < 2:
        raise ValueError(f"{path} holds {len(texts)} non-empty line(s); calibration needs at least 2 texts")
    return texts
