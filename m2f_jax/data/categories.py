"""Category tables of the supported data sets (facts from the data sets' own definitions).

Each table lists categories in contiguous order 0..K-1 (the order of the data set's sorted
original ids, as the authors' detectron2 registration does).
"""

# COCO 2017 panoptic: (original id, name, is thing). The 80 things are also COCO instance's classes.
COCO_PANOPTIC = (
    (1, "person", 1), (2, "bicycle", 1), (3, "car", 1), (4, "motorcycle", 1), (5, "airplane", 1),
    (6, "bus", 1), (7, "train", 1), (8, "truck", 1), (9, "boat", 1), (10, "traffic light", 1),
    (11, "fire hydrant", 1), (13, "stop sign", 1), (14, "parking meter", 1), (15, "bench", 1),
    (16, "bird", 1), (17, "cat", 1), (18, "dog", 1), (19, "horse", 1), (20, "sheep", 1),
    (21, "cow", 1), (22, "elephant", 1), (23, "bear", 1), (24, "zebra", 1), (25, "giraffe", 1),
    (27, "backpack", 1), (28, "umbrella", 1), (31, "handbag", 1), (32, "tie", 1),
    (33, "suitcase", 1), (34, "frisbee", 1), (35, "skis", 1), (36, "snowboard", 1),
    (37, "sports ball", 1), (38, "kite", 1), (39, "baseball bat", 1), (40, "baseball glove", 1),
    (41, "skateboard", 1), (42, "surfboard", 1), (43, "tennis racket", 1), (44, "bottle", 1),
    (46, "wine glass", 1), (47, "cup", 1), (48, "fork", 1), (49, "knife", 1), (50, "spoon", 1),
    (51, "bowl", 1), (52, "banana", 1), (53, "apple", 1), (54, "sandwich", 1), (55, "orange", 1),
    (56, "broccoli", 1), (57, "carrot", 1), (58, "hot dog", 1), (59, "pizza", 1), (60, "donut", 1),
    (61, "cake", 1), (62, "chair", 1), (63, "couch", 1), (64, "potted plant", 1), (65, "bed", 1),
    (67, "dining table", 1), (70, "toilet", 1), (72, "tv", 1), (73, "laptop", 1), (74, "mouse", 1),
    (75, "remote", 1), (76, "keyboard", 1), (77, "cell phone", 1), (78, "microwave", 1),
    (79, "oven", 1), (80, "toaster", 1), (81, "sink", 1), (82, "refrigerator", 1), (84, "book", 1),
    (85, "clock", 1), (86, "vase", 1), (87, "scissors", 1), (88, "teddy bear", 1),
    (89, "hair drier", 1), (90, "toothbrush", 1),
    (92, "banner", 0), (93, "blanket", 0), (95, "bridge", 0), (100, "cardboard", 0),
    (107, "counter", 0), (109, "curtain", 0), (112, "door-stuff", 0), (118, "floor-wood", 0),
    (119, "flower", 0), (122, "fruit", 0), (125, "gravel", 0), (128, "house", 0), (130, "light", 0),
    (133, "mirror-stuff", 0), (138, "net", 0), (141, "pillow", 0), (144, "platform", 0),
    (145, "playingfield", 0), (147, "railroad", 0), (148, "river", 0), (149, "road", 0),
    (151, "roof", 0), (154, "sand", 0), (155, "sea", 0), (156, "shelf", 0), (159, "snow", 0),
    (161, "stairs", 0), (166, "tent", 0), (168, "towel", 0), (171, "wall-brick", 0),
    (175, "wall-stone", 0), (176, "wall-tile", 0), (177, "wall-wood", 0), (178, "water-other", 0),
    (180, "window-blind", 0), (181, "window-other", 0), (184, "tree-merged", 0),
    (185, "fence-merged", 0), (186, "ceiling-merged", 0), (187, "sky-other-merged", 0),
    (188, "cabinet-merged", 0), (189, "table-merged", 0), (190, "floor-other-merged", 0),
    (191, "pavement-merged", 0), (192, "mountain-merged", 0), (193, "grass-merged", 0),
    (194, "dirt-merged", 0), (195, "paper-merged", 0), (196, "food-other-merged", 0),
    (197, "building-other-merged", 0), (198, "rock-merged", 0), (199, "wall-other-merged", 0),
    (200, "rug-merged", 0),
)
COCO_INSTANCE = tuple(c for c in COCO_PANOPTIC if c[2])

# ADE20K SceneParsing 150 classes; annotation PNG value v in 1..150 is class v - 1 (0 = ignore).
ADE20K_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
# Thing classes of ADE20K panoptic (contiguous ids), as in the authors' ADE20K panoptic registration.
ADE20K_THING_IDS = frozenset((
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41, 42,
    43, 44, 45, 47, 49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74, 75, 76,
    78, 80, 81, 82, 83, 85, 86, 87, 88, 89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107, 108, 110,
    111, 112, 115, 116, 118, 119, 120, 121, 123, 124, 125, 126, 127, 129, 130, 132, 133, 134, 135,
    136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
))

# Cityscapes: (label id, name, train id, has instances). Label ids not listed map to train id 255.
CITYSCAPES_LABELS = (
    (7, "road", 0, 0), (8, "sidewalk", 1, 0), (11, "building", 2, 0), (12, "wall", 3, 0),
    (13, "fence", 4, 0), (17, "pole", 5, 0), (19, "traffic light", 6, 0),
    (20, "traffic sign", 7, 0), (21, "vegetation", 8, 0), (22, "terrain", 9, 0), (23, "sky", 10, 0),
    (24, "person", 11, 1), (25, "rider", 12, 1), (26, "car", 13, 1), (27, "truck", 14, 1),
    (28, "bus", 15, 1), (31, "train", 16, 1), (32, "motorcycle", 17, 1), (33, "bicycle", 18, 1),
)
# Labels with instances that are ignored in evaluation (caravan, trailer): never targets.
CITYSCAPES_IGNORED_INSTANCE_LABELS = frozenset((29, 30))
