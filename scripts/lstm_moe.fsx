// BiLSTM + MoE (the setting of Shazeer et al. 2017) on CoNLL-2003 NER and SQuAD 1.1 extractive QA with GloVe
// 6B 50d vectors: a baseline with one MLP expert, and MoE layers of 8 experts, top-2, with naive top-k, top-k
// mask, noisy top-k, top-k mask + importance loss and noisy top-k + load loss, on each data set. Tables: token
// accuracy and conlleval entity P/R/F1; SQuAD exact match and F1; validation loss, load CV, training time.
// Prints its tables and writes reports/lstm_moe.html (report page: loss curves, router distributions, expert
// usage of the twelve runs) and reports/lstm_moe.md (the tables); its figure (entity F1, SQuAD F1 and load CV
// per model) goes to reports/lstm_moe-figure.html and, where Chromium is installed, reports/lstm_moe.png;
// runs go to runs/lstm_moe/.
//
//   dotnet fsi scripts/lstm_moe.fsx                 # quick settings on the samples in ../shared/data (about 12 CPU-minutes)
//   dotnet fsi scripts/lstm_moe.fsx --smoke         # a handful of steps on a few examples
//   dotnet fsi scripts/lstm_moe.fsx --train-embeddings   # fine-tune the GloVe vectors (frozen by default)
//   dotnet fsi scripts/lstm_moe.fsx --full --conll CONLL_DIR --squad SQUAD_DIR --glove glove.6B.50d.txt
//                                                   # whole data sets: eng.train/testa/testb; *train*.json and *dev*.json
#load "prelude.fsx"

open System.IO
open Moe

/// The study for script arguments (without the script's name); data defaults to the repository's ../shared/data.
let main (args: string[]) =
    Native.initialise ()
    let shared = Path.GetFullPath(Path.Combine(__SOURCE_DIRECTORY__, "..", "..", "shared", "data"))
    LstmMoe.LstmMoeOptions.parseOrFail shared args |> LstmMoe.run

main (fsi.CommandLineArgs |> Array.tail) |> ignore
