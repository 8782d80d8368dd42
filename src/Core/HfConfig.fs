/// Reading a Hugging Face `config.json` (or `generation_config.json`) so that every field is either used or
/// rejected by name: a family's parser takes the fields it honours with typed getters, names the fields that
/// cannot change what it computes (`Ignore`), and `Finish` fails on anything left, so a checkpoint that sets
/// a field the toolkit does not implement is refused instead of silently computing something else.
module Moe.HfConfig

open System
open System.Collections.Generic
open System.IO
open System.Text.Json

/// Fields every `transformers` config may carry that do not change what a model computes: bookkeeping,
/// hub metadata, and the generation defaults that older checkpoints keep in `config.json` (those are read
/// by the generation config, not the model).
let bookkeepingFields =
    [ "_name_or_path"; "architectures"; "transformers_version"; "torch_dtype"; "model_type"; "_commit_hash"
      "id2label"; "label2id"; "finetuning_task"; "problem_type"; "task_specific_params"; "return_dict"
      "output_hidden_states"; "output_attentions"; "torchscript"; "use_bfloat16"; "tf_legacy_loss"
      "pruned_heads"; "chunk_size_feed_forward"; "is_encoder_decoder"; "is_decoder"; "add_cross_attention"
      "tie_encoder_decoder"; "cross_attention_hidden_size"; "prefix"; "tokenizer_class"; "use_cache"
      "gradient_checkpointing"; "transformers.js_config"
      // generation defaults kept in config.json by older checkpoints
      "bos_token_id"; "eos_token_id"; "pad_token_id"; "decoder_start_token_id"; "sep_token_id"
      "forced_bos_token_id"; "forced_eos_token_id"; "max_length"; "min_length"; "num_beams"; "length_penalty"
      "early_stopping"; "no_repeat_ngram_size"; "do_sample"; "temperature"; "top_k"; "top_p"
      "repetition_penalty"; "num_return_sequences"; "bad_words_ids"; "diversity_penalty"; "num_beam_groups"
      "encoder_no_repeat_ngram_size"; "output_scores"; "return_dict_in_generate"; "remove_invalid_values"
      "exponential_decay_length_penalty"; "suppress_tokens"; "begin_suppress_tokens"; "typical_p" ]

/// A JSON object read field by field; every failure names the file and the field.
type ConfigReader(path: string, root: JsonElement) =
    let used = HashSet<string>()
    let fail (name: string) (expected: string) (got: JsonElement) =
        failwithf "%s: field \"%s\": expected %s, got %s" path name expected (got.GetRawText())
    let tryGet (name: string) : JsonElement option =
        match root.TryGetProperty name with
        | true, v ->
            used.Add name |> ignore
            if v.ValueKind = JsonValueKind.Null then None else Some v
        | _ -> None
    let required (name: string) (expected: string) =
        match tryGet name with
        | Some v -> v
        | None -> failwithf "%s: missing field \"%s\" (expected %s)" path name expected
    let asInt name (v: JsonElement) =
        match v.ValueKind with
        | JsonValueKind.Number ->
            match v.TryGetInt32() with
            | true, i -> i
            | _ -> fail name "an integer" v
        | _ -> fail name "an integer" v
    let asFloat name (v: JsonElement) =
        if v.ValueKind = JsonValueKind.Number then v.GetDouble() else fail name "a number" v
    let asBool name (v: JsonElement) =
        match v.ValueKind with
        | JsonValueKind.True -> true
        | JsonValueKind.False -> false
        | _ -> fail name "true or false" v
    let asString name (v: JsonElement) =
        if v.ValueKind = JsonValueKind.String then v.GetString() else fail name "a string" v

    /// Reads `path`, which must hold one JSON object.
    static member Open(path: string) : ConfigReader =
        if not (File.Exists path) then failwithf "%s: file not found" path
        let doc =
            try JsonDocument.Parse(File.ReadAllText path)
            with :? JsonException as e -> failwithf "%s: not valid JSON (%s)" path e.Message
        if doc.RootElement.ValueKind <> JsonValueKind.Object then
            failwithf "%s: expected a JSON object, got %A" path doc.RootElement.ValueKind
        ConfigReader(path, doc.RootElement.Clone())

    /// The file read.
    member _.Path = path
    /// The whole object, for reading nested fields.
    member _.Root = root
    /// Whether the field is present and not null (does not mark it used).
    member _.Has(name: string) =
        match root.TryGetProperty name with
        | true, v -> v.ValueKind <> JsonValueKind.Null
        | _ -> false
    member _.Int(name: string) : int = required name "an integer" |> asInt name
    member _.IntOr(name: string, fallback: int) : int = tryGet name |> Option.map (asInt name) |> Option.defaultValue fallback
    member _.IntOption(name: string) : int option = tryGet name |> Option.map (asInt name)
    /// An integer or a list of integers (e.g. `eos_token_id`), as a list; empty when absent or null.
    member _.IntList(name: string) : int list =
        match tryGet name with
        | None -> []
        | Some v when v.ValueKind = JsonValueKind.Array -> [ for e in v.EnumerateArray() -> asInt name e ]
        | Some v -> [ asInt name v ]
    member _.Float(name: string) : float = required name "a number" |> asFloat name
    member _.FloatOr(name: string, fallback: float) : float = tryGet name |> Option.map (asFloat name) |> Option.defaultValue fallback
    member _.FloatOption(name: string) : float option = tryGet name |> Option.map (asFloat name)
    member _.Bool(name: string) : bool = required name "true or false" |> asBool name
    member _.BoolOr(name: string, fallback: bool) : bool = tryGet name |> Option.map (asBool name) |> Option.defaultValue fallback
    member _.String(name: string) : string = required name "a string" |> asString name
    member _.StringOr(name: string, fallback: string) : string = tryGet name |> Option.map (asString name) |> Option.defaultValue fallback
    member _.StringOption(name: string) : string option = tryGet name |> Option.map (asString name)
    /// The raw element of a field (marked used), for nested objects such as `rope_scaling`.
    member _.Element(name: string) : JsonElement option = tryGet name
    /// Marks fields that cannot change what the model computes (absent ones are fine).
    member _.Ignore(names: string seq) = for n in names do used.Add n |> ignore
    /// Fails naming a field whose value is not supported, with the values that are.
    member _.Unsupported(name: string, supported: string) : 'a =
        let got = match root.TryGetProperty name with | true, v -> v.GetRawText() | _ -> "nothing"
        failwithf "%s: field \"%s\" = %s is not supported (supported: %s)" path name got supported
    /// Fields present in the file that no getter read and no `Ignore` named.
    member _.Unread() : string list =
        [ for p in root.EnumerateObject() do if not (used.Contains p.Name) then p.Name ]
    /// Fails naming every field left unread: the toolkit would otherwise ignore it silently.
    member this.Finish() =
        match this.Unread() with
        | [] -> ()
        | names -> failwithf "%s: unsupported field(s) %s: the toolkit does not implement them, so it refuses the checkpoint rather than compute something else" path (String.Join(", ", names |> List.map (sprintf "\"%s\"")))
