"""Training, data preparation and evaluation of Latent Guidance Predictors: the layout's `training/` folder, installed
as `pipeline_sketch_guided.training` (one copy). From a checkout's root, as diffusers' examples run:

python training/prepare_data.py --input_dir my_images --output_dir data/lgp --resolution 512
accelerate launch training/train_lgp.py --pretrained_model_name_or_path <base> --train_data_dir data/lgp ...
python training/evaluate.py --pretrained_model_name_or_path <base> --lgp <output_dir> --pairs data/lgp_val ...

Installed, from any folder: `sketch-guided train PROGRAM ...` or
`python -m pipeline_sketch_guided.training.PROGRAM ...`.
"""
