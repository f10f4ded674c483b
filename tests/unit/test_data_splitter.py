"""Caption splitter and RSVQA QA -> caption rules."""
from rsmoe.data.rsvqa_captions import parts_to_caption, qa_to_parts
from rsmoe.data.splitter import split_caption, split_sentences


def _sentences(parts):
    return sorted(s for p in parts.values() for s in split_sentences(p))


def test_rsicap_style_caption():
    cap = ("This is a high-resolution aerial image showing a residential area. There are twelve white buildings "
           "along the road. A parking lot lies to the left of the school.")
    parts = split_caption(cap)
    assert parts["theme"] == "This is a high-resolution aerial image showing a residential area."
    assert parts["objects"] == "There are twelve white buildings along the road."
    assert parts["relations"] == "A parking lot lies to the left of the school."


def test_long_caption_every_sentence_in_exactly_one_part():
    cap = ("This image shows an airport. Two white planes are parked on the apron. The runway is parallel to "
           "the terminal. Several cars are in the parking lot next to the terminal building. A large grey "
           "hangar is in the upper right corner. The roads are surrounded by green grass.")
    parts = split_caption(cap)
    assert _sentences(parts) == sorted(split_sentences(cap))
    assert parts["theme"] == "This image shows an airport."
    assert "Two white planes are parked on the apron." in parts["objects"]
    assert "A large grey hangar is in the upper right corner." in parts["objects"]
    assert "The runway is parallel to the terminal." in parts["relations"]
    assert "The roads are surrounded by green grass." in parts["relations"]


def test_short_ucm_captions():
    assert split_caption("There are many buildings and some green trees .") == {
        "theme": "There are many buildings and some green trees.", "objects": "", "relations": ""}
    assert split_caption("There is a piece of farmland .")["theme"] == "There is a piece of farmland."
    parts = split_caption("Many cars are parked next to the road .")
    assert parts == {"theme": "", "objects": "", "relations": "Many cars are parked next to the road."}
    assert split_caption("") == {"theme": "", "objects": "", "relations": ""}


def test_weak_relation_without_attributes_is_relation():
    parts = split_caption("This is a forest area. A river runs through the forest.")
    assert parts["relations"] == "A river runs through the forest."


QA_LR = [
    {"question": "Is it a rural or an urban area", "answer": "rural", "type": "rural_urban"},
    {"question": "Is there a water area?", "answer": "yes", "type": "presence"},
    {"question": "What is the number of forests in the image?", "answer": "4", "type": "count"},
    {"question": "Is a road present?", "answer": "yes", "type": "presence"},
    {"question": "How many roads are there?", "answer": "13", "type": "count"},
    {"question": "Is there a commercial building?", "answer": "no", "type": "presence"},
    {"question": "Are there more roads than water areas?", "answer": "yes", "type": "comp"},
    {"question": "Are there less forests than roads in the image?", "answer": "yes", "type": "comp"},
    {"question": "Is the number of roads equal to the number of forests?", "answer": "no", "type": "comp"},
    {"question": "What is the number of roads on the left of a  water area?", "answer": "3", "type": "count"},
    {"question": "What is the number of small farmlands?", "answer": "1", "type": "count"},
]


def test_qa_to_parts_lr():
    parts = qa_to_parts(QA_LR, sensor="S2", resolution="10m")
    assert parts["theme"] == ("This is a Sentinel-2 satellite image at 10 m resolution of a rural area. "
                              "The land use includes water areas, forest and farmland.")
    assert parts["objects"] == ("There is a water area. There are 4 forests. There are 13 roads. "
                                "There is one small farmland. There is no commercial building.")
    assert parts["relations"] == ("There are more roads than water areas. There are fewer forests than roads. "
                                  "There are 3 roads on the left of a water area.")
    assert parts_to_caption(parts).startswith("This is a Sentinel-2")


def test_qa_to_parts_hr_no_rural_urban_and_deterministic():
    qa = [
        {"question": "Is a residential building present?", "answer": "yes", "type": "presence"},
        {"question": "What is the area covered by buildings?", "answer": "3787m2", "type": "area"},
        {"question": "How many residential areas are there?", "answer": "1", "type": "count"},
        {"question": "Is the number of roads equal to the number of buildings?", "answer": "yes", "type": "comp"},
    ]
    parts = qa_to_parts(qa, sensor="ULTRACAM_EAGLE_FALCON", resolution=".1524m")
    assert parts["theme"] == ("This is a high-resolution aerial image at 15 cm resolution. "
                              "The land use includes residential areas.")
    assert parts["objects"] == "There is a residential building. Buildings cover 3787 m². There is one residential area."
    assert parts["relations"] == "The number of roads equals the number of buildings."
    assert qa_to_parts(list(qa), sensor="ULTRACAM_EAGLE_FALCON", resolution=".1524m") == parts


def test_qa_caption_limits():
    qa = [{"question": f"How many thing{i}s are there?", "answer": str(i + 1), "type": "count"} for i in range(20)]
    parts = qa_to_parts(qa, max_objects=3)
    assert len(split_sentences(parts["objects"])) == 3
