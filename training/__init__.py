"""Training, data preparation and evaluation of Latent Guidance Predictors. Run the steps from the repository root:

python -m pipeline_sketch_guided.training.prepare_data --input_dir my_images --output_dir data/lgp --resolution 512
accelerate launch -m pipeline_sketch_guided.training.train_lgp --pretrained_model_name_or_path <base> \
    --train_data_dir data/lgp ...
python -m pipeline_sketch_guided.training.evaluate --pretrained_model_name_or_path <base> --lgp <output_dir> \
    --pairs data/lgp_val ...
"""
