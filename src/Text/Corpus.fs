/// A synthetic extreme-summarization corpus, generated deterministically from a seed (all text written
/// here). Each document belongs to one topic (sport, politics, science, business, weather, culture) with
/// its own vocabulary. It states three key facts (who did what, where, and a number) in separate sentences,
/// in random order among distractor sentences, some of which mention other names, places and numbers as
/// background. The one-sentence summary is a fixed function of (topic, event, who, where, number) written
/// with a template whose wording differs from the document's, like XSum's abstractive summaries, so the
/// lead sentence overlaps it little while a model that reads the whole document can get it exactly.
module Moe.Corpus

open System
open System.Text
open Moe.Data

/// Corpus settings.
type CorpusConfig =
    { Seed: int
      /// Sentences per document, before length adjustment (which only adds or removes distractors).
      MinSentences: int
      MaxSentences: int
      /// Words per document: distractors are added below `MinWords` and removed above `MaxWords`.
      MinWords: int
      MaxWords: int
      /// Probability that a document carries one "background" distractor naming another actor, place
      /// and number of its topic, so copying the first name or number seen is not enough.
      HardDistractorRate: float
      TrainSize: int
      ValidSize: int
      TestSize: int }

module CorpusConfig =
    /// XSum-like proportions at a size a small model learns in minutes on a laptop.
    let defaults =
        { Seed = 17
          MinSentences = 5
          MaxSentences = 15
          MinWords = 100
          MaxWords = 250
          HardDistractorRate = 0.5
          TrainSize = 6000
          ValidSize = 300
          TestSize = 300 }

    let validate (cfg: CorpusConfig) : string list =
        [ if cfg.MinSentences < 4 then sprintf "MinSentences must be >= 4 (three fact sentences and a distractor), got %d" cfg.MinSentences
          if cfg.MaxSentences < cfg.MinSentences then sprintf "MaxSentences (%d) must be >= MinSentences (%d)" cfg.MaxSentences cfg.MinSentences
          if cfg.MinWords < 1 then sprintf "MinWords must be >= 1, got %d" cfg.MinWords
          if cfg.MaxWords < cfg.MinWords then sprintf "MaxWords (%d) must be >= MinWords (%d)" cfg.MaxWords cfg.MinWords
          if not (cfg.HardDistractorRate >= 0.0 && cfg.HardDistractorRate <= 1.0) then
              sprintf "HardDistractorRate must be in [0, 1], got %g" cfg.HardDistractorRate
          if cfg.TrainSize < 0 || cfg.ValidSize < 0 || cfg.TestSize < 0 then
              sprintf "split sizes must be >= 0, got %d/%d/%d" cfg.TrainSize cfg.ValidSize cfg.TestSize ]

/// SplitMix64 (Steele, Lea & Flood 2014): a fixed generator, so a seed gives the same corpus on every
/// platform and .NET version.
type private Rng(seed: uint64) =
    let mutable state = seed
    member _.Next() : uint64 =
        state <- state + 0x9E3779B97F4A7C15UL
        let mutable z = state
        z <- (z ^^^ (z >>> 30)) * 0xBF58476D1CE4E5B9UL
        z <- (z ^^^ (z >>> 27)) * 0x94D049BB133111EBUL
        z ^^^ (z >>> 31)
    /// Uniform in 0 .. n - 1.
    member r.Below(n: int) : int = int (r.Next() % uint64 n)
    /// Uniform in lo .. hi.
    member r.Range(lo: int, hi: int) : int = lo + r.Below(hi - lo + 1)
    member r.Unit() : float = float (r.Next() >>> 11) / 9007199254740992.0
    member r.Pick(items: 'a[]) : 'a = items[r.Below items.Length]
    /// Example `index` of corpus `seed` gets its own stream, so a corpus is a prefix of any larger one.
    static member For(seed: int, index: int) =
        Rng((uint64 (uint32 seed) <<< 32) ||| uint64 (uint32 index))

/// One kind of news event. Templates fill `{who}`, `{where}`, `{n}`.
type private Event =
    { /// Who did what (mentions `{who}` only).
      Key: string[]
      /// The number, in words the summary does not use.
      Number: string[]
      Range: int * int
      /// The summary: one template, so it is determined by the facts.
      Summary: string }

type private Topic =
    { Name: string
      Agents: string[]
      Events: Event[]
      /// Where it happened (mentions `{where}` only).
      Place: string[]
      /// Sentences of the topic that carry no fact.
      Filler: string[]
      /// Background sentences naming another actor `{who2}`, place `{where2}`, number `{n2}`.
      Background: string[] }

let private places =
    [| "Ardley"; "Brackwell"; "Corrin"; "Dunmere"; "Eastholm"; "Fallowby"; "Garrick"; "Halden"; "Istow"; "Kelby"
       "Lorne"; "Marrowby"; "Norwick"; "Pellham"; "Rensby"; "Saltmere"; "Tarnfield"; "Ulverby"; "Vantry"; "Westcombe"
       "Yarrowby"; "Quillan"; "Oxbridge Vale"; "Penmoor" |]

let private common =
    [| "Local residents said they had followed the story closely over the past few weeks."
       "A spokesperson said further details would be shared with the public in due course."
       "The news was widely discussed on social media throughout the day."
       "Several observers said the outcome had been difficult to predict only a month ago."
       "Reporters gathered outside the building long before anyone was ready to comment."
       "It is the latest in a series of developments that have drawn national attention."
       "Neighbours described the mood in the area as cautious but hopeful."
       "Officials declined to answer questions about what might happen next." |]

let private topics : Topic[] =
    [| { Name = "sport"
         Agents =
           [| "the Red Falcons"; "the Northside Harriers"; "the Blue Otters"; "the Iron Wolves"; "the Silver Herons"
              "the Granite Stags"; "the Amber Foxes"; "the Coastal Rams"; "the Valley Kestrels"; "the Harbour Lions" |]
         Events =
           [| { Key = [| "{who} secured a hard-fought victory over their closest challengers on Saturday afternoon."
                         "A late surge handed {who} a memorable triumph in front of a packed and noisy crowd." |]
                Number = [| "The winners finished the afternoon with {n} points, their best return of the campaign."
                            "When the final whistle sounded the scoreboard showed {n} points for the home favourites." |]
                Range = (40, 120)
                Summary = "{who} have beaten their rivals in {where}, finishing with {n} points." }
              { Key = [| "{who} slipped to a disappointing loss against a well-drilled and patient opponent."
                         "It was a frustrating day for {who}, who were outplayed for long spells of the contest." |]
                Number = [| "Despite the result, the side still managed to put {n} points on the board."
                            "The beaten team ended the match on {n} points, well short of what was needed." |]
                Range = (20, 90)
                Summary = "{who} lost in {where} even though they scored {n} points." }
              { Key = [| "{who} have completed a deal for a highly rated young forward after lengthy negotiations."
                         "A promising young striker has agreed terms with {who} ahead of the new season." |]
                Number = [| "The transfer fee is understood to be around {n} million pounds."
                            "Sources close to the negotiations put the cost of the move at {n} million pounds." |]
                Range = (2, 60)
                Summary = "{who} signed a new striker for {n} million pounds, unveiling him in {where}." }
              { Key = [| "{who} will be without their captain for several weeks because of a knee problem."
                         "A knee injury has ruled the captain of {who} out of the coming fixtures." |]
                Number = [| "Medical staff expect the recovery to take roughly {n} days."
                            "The club doctor said the player would need about {n} days of rest and treatment." |]
                Range = (10, 90)
                Summary = "Injury will keep the captain of {who} out for {n} days after a setback in {where}." }
              { Key = [| "{who} have unveiled plans for a modern stadium to replace their ageing ground."
                         "Supporters of {who} were shown designs for a new home ground at a special meeting." |]
                Number = [| "The proposed arena would hold {n} thousand spectators when complete."
                            "Architects have drawn up a bowl with room for {n} thousand fans." |]
                Range = (8, 70)
                Summary = "{who} intend to build a {n}-thousand-seat stadium in {where}." } |]
         Place =
           [| "The match was played at the main stadium in {where}."
              "Fans travelled from across the region to {where} for the occasion."
              "Everything unfolded at the club's ground in {where}." |]
         Filler =
           [| "The weather stayed dry and the pitch was in excellent condition throughout."
              "Coaches on both sides praised the discipline and energy of their players."
              "Several young players were given a rare chance to impress from the bench."
              "The referee kept a firm grip on a game that threatened to boil over at times."
              "Ticket sales for the rest of the season have risen sharply in recent weeks."
              "The league table remains tight with only a handful of rounds left to play."
              "Former players in the stands applauded loudly as the teams left the field."
              "The training staff have introduced a new fitness programme over the winter."
              "Television coverage of the fixture attracted a large audience across the country." |]
         Background =
           [| "Last season {who2} finished with {n2} points after a difficult trip to {where2}."
              "Earlier in the year a match between {who2} and a local side in {where2} ended on {n2} points." |] }
       { Name = "politics"
         Agents =
           [| "Minister Helena Marsh"; "Senator Victor Oyelaran"; "Mayor Tobias Grint"; "Councillor Priya Anand"
              "Governor Marcus Dade"; "Speaker Ruth Okafor"; "Deputy Leon Farrow"; "Chancellor Ingrid Solberg"
              "Minister Yusuf Berrada"; "Senator Clara Whitlow" |]
         Events =
           [| { Key = [| "{who} claimed victory in the closely watched election after a long and bitter campaign."
                         "Voters handed {who} a clear mandate at the end of a tense election night." |]
                Number = [| "Official figures showed a turnout of {n} per cent across the constituency."
                            "Returning officers said {n} per cent of registered voters took part." |]
                Range = (30, 85)
                Summary = "{who} has won the vote in {where}, where {n}% of electors turned out." }
              { Key = [| "{who} stepped down on Monday, ending weeks of speculation about the department."
                         "After mounting pressure from colleagues, {who} announced a resignation in a short statement." |]
                Number = [| "The departing official had held the role for {n} months."
                            "It brings to an end a spell in office that lasted {n} months." |]
                Range = (3, 96)
                Summary = "{who} has quit after {n} months in the job, making the announcement in {where}." }
              { Key = [| "A bill introduced by {who} cleared its final stage in the assembly."
                         "Lawmakers approved legislation championed by {who} after a lengthy debate." |]
                Number = [| "The measure passed with {n} members voting in favour."
                            "Records show {n} representatives backed the proposal on the final reading." |]
                Range = (51, 320)
                Summary = "A new law proposed by {who} was approved with {n} votes, the assembly in {where} confirmed." }
              { Key = [| "{who} set out plans to increase spending on schools and local roads."
                         "Extra money for classrooms and road repairs was promised by {who} in a keynote speech." |]
                Number = [| "The package is worth {n} million pounds over the next three years."
                            "Treasury documents put the total cost at {n} million pounds." |]
                Range = (5, 900)
                Summary = "{who} is pledging {n} million pounds for schools and roads, speaking in {where}." }
              { Key = [| "Crowds gathered to voice anger at a decision taken by {who} last month."
                         "Demonstrators marched through the streets to criticise a policy backed by {who}." |]
                Number = [| "Organisers estimated that {n} hundred people took part."
                            "Police said roughly {n} hundred marchers joined the demonstration." |]
                Range = (2, 50)
                Summary = "About {n} hundred people protested against {who} in {where}." } |]
         Place =
           [| "The announcement was made at a press conference in {where}."
              "The decision was confirmed during a visit to {where}."
              "Events unfolded at the town hall in {where}." |]
         Filler =
           [| "Opposition members said they would study the details carefully before responding."
              "The cabinet is expected to meet again later in the week to discuss the matter."
              "Analysts said the debate reflected deep divisions within the governing coalition."
              "Campaign groups have promised to keep up the pressure in the coming months."
              "Parliamentary committees will examine the proposals in the new session."
              "Polling suggests that voters remain divided on the most important issues."
              "Party officials urged members to stay united ahead of the next round of talks."
              "Constitutional experts said the procedure had been followed correctly."
              "Civil servants have been asked to prepare briefing papers on the options." |]
         Background =
           [| "Two years ago {who2} faced a similar test in {where2}, where {n2} per cent backed the plan."
              "In a separate development, {who2} met officials in {where2} to discuss a {n2} million pound grant." |] }
       { Name = "science"
         Agents =
           [| "the Lumen Institute"; "the Polar Research Group"; "Crestfield University"; "the Meridian Laboratory"
              "the Helix Centre"; "the Aurora Observatory"; "the Tidewater Marine Unit"; "the Kestrel Space Agency"
              "Brightwater College"; "the Orchard Genetics Lab" |]
         Events =
           [| { Key = [| "Scientists from {who} have described a previously unknown species of tree frog."
                         "A tiny amphibian new to science has been identified by a team at {who}." |]
                Number = [| "The animal measures just {n} millimetres from nose to tail."
                            "Adult specimens grow to only {n} millimetres in length." |]
                Range = (8, 60)
                Summary = "Researchers at {who} found a new {n}mm frog species near {where}." }
              { Key = [| "Astronomers at {who} reported a faint comet moving through the outer solar system."
                         "A previously unseen comet has been detected by astronomers working with {who}." |]
                Number = [| "It is expected to make its closest approach to the Sun in {n} years."
                            "Calculations suggest the icy body will swing past the Sun in {n} years." |]
                Range = (3, 400)
                Summary = "A comet spotted by {who} from {where} will come closest to the Sun in {n} years." }
              { Key = [| "A treatment developed at {who} eased symptoms in patients with chronic headaches."
                         "Early results from {who} suggest a new therapy can relieve persistent migraines." |]
                Number = [| "Around {n} per cent of volunteers reported a lasting improvement."
                            "The trial found that {n} per cent of participants felt better after treatment." |]
                Range = (20, 90)
                Summary = "A headache drug from {who} helped {n}% of patients in a trial in {where}." }
              { Key = [| "Researchers at {who} have unearthed the bones of a large prehistoric reptile."
                         "Fossil hunters working for {who} uncovered the skeleton of an ancient sea reptile." |]
                Number = [| "The creature is thought to have lived around {n} million years ago."
                            "Dating of the surrounding rock places the animal at {n} million years old." |]
                Range = (65, 300)
                Summary = "{who} identified a reptile that lived {n} million years ago from remains found in {where}." }
              { Key = [| "Engineers at {who} have built a battery that charges far faster than current designs."
                         "A rapid charging cell designed by engineers at {who} has passed its first tests." |]
                Number = [| "In laboratory tests it reached full charge in {n} minutes."
                            "The prototype was fully charged after only {n} minutes." |]
                Range = (2, 45)
                Summary = "{who} showed a battery in {where} that fully charges within {n} minutes." } |]
         Place =
           [| "The work was carried out at a field station near {where}."
              "The findings were presented at a scientific meeting in {where}."
              "The research took place at a laboratory in {where}." |]
         Filler =
           [| "The study has been published in a peer reviewed journal this week."
              "Independent experts said the results were promising but needed confirmation."
              "Funding for the project came from a national research council."
              "The team plans to repeat the measurements with more sensitive equipment."
              "Data from the experiments will be shared openly with other laboratories."
              "Students helped to collect and catalogue thousands of samples over several years."
              "Similar work elsewhere has produced mixed and sometimes contradictory results."
              "The researchers said that careful statistics were essential to the analysis."
              "A larger follow-up study is already being planned for next year." |]
         Background =
           [| "In earlier work {who2} reported a figure of {n2} from samples taken near {where2}."
              "A rival group at {who2} in {where2} has published an estimate of {n2} for a related measure." |] }
       { Name = "business"
         Agents =
           [| "Talvik Foods"; "Brightway Motors"; "Norda Bank"; "Quillon Software"; "Harlow Steel"; "Pinecrest Airlines"
              "Olvera Retail"; "Sundial Energy"; "Marlo Telecom"; "Greystone Insurance" |]
         Events =
           [| { Key = [| "{who} reported stronger trading than expected for the first half of the year."
                         "Shares in {who} climbed after the firm delivered better results than analysts forecast." |]
                Number = [| "Profits rose by {n} per cent compared with the same period last year."
                            "Earnings were {n} per cent higher than a year earlier." |]
                Range = (3, 60)
                Summary = "Profits at {who} grew {n}% in the first half, the {where} firm said." }
              { Key = [| "{who} confirmed it will close one of its largest sites as part of a restructuring."
                         "A major site run by {who} is to shut under a cost cutting plan." |]
                Number = [| "The move puts {n} hundred jobs at risk."
                            "Unions said {n} hundred workers could lose their livelihoods." |]
                Range = (1, 40)
                Summary = "{who} is to axe {n} hundred jobs by shutting its plant in {where}." }
              { Key = [| "{who} agreed to buy a smaller rival after months of talks."
                         "The board of {who} has approved the takeover of a competitor." |]
                Number = [| "The deal values the business at {n} million pounds."
                            "The acquisition is worth {n} million pounds including debt." |]
                Range = (10, 950)
                Summary = "{who} will acquire a rival for {n} million pounds, it announced in {where}." }
              { Key = [| "{who} will open a new plant to meet growing demand for its products."
                         "Construction is due to begin on a factory for {who} later this year." |]
                Number = [| "The site is expected to create {n} hundred jobs."
                            "Bosses said the investment would bring {n} hundred new posts." |]
                Range = (1, 30)
                Summary = "A new {who} factory in {where} will bring {n} hundred jobs." }
              { Key = [| "{who} was fined by regulators for failing to treat customers fairly."
                         "The watchdog has penalised {who} over the way it handled complaints." |]
                Number = [| "The penalty totals {n} million pounds."
                            "The firm must pay {n} million pounds, the regulator said." |]
                Range = (1, 200)
                Summary = "{who} must pay {n} million pounds over its treatment of customers in {where}." } |]
         Place =
           [| "The news came from the company's headquarters in {where}."
              "Executives briefed investors at an event in {where}."
              "Staff at the firm's offices in {where} were told first." |]
         Filler =
           [| "Investors have been watching the sector closely since interest rates began to rise."
              "The chief executive said the business was well placed to cope with higher costs."
              "Competition in the market has intensified as new entrants arrive from overseas."
              "Analysts at several banks said they would review their forecasts."
              "Consumer spending has held up better than many economists had expected."
              "The company has invested heavily in digital services over the past decade."
              "Suppliers have warned that prices for raw materials remain volatile."
              "A full annual report will be published in the spring."
              "Trading in the shares was unusually heavy during the morning session." |]
         Background =
           [| "Last year {who2} reported a rise of {n2} per cent at its base in {where2}."
              "Rival {who2} announced a {n2} million pound investment in {where2} earlier this month." |] }
       { Name = "weather"
         Agents =
           [| "Storm Imelda"; "Storm Bram"; "Storm Corin"; "Storm Delphine"; "Storm Ewan"; "Storm Freya"; "Storm Gideon"
              "Storm Hester"; "Storm Ione"; "Storm Jasper" |]
         Events =
           [| { Key = [| "Heavy rain brought by {who} left roads under water and homes without power."
                         "Rivers burst their banks as {who} swept in from the Atlantic." |]
                Number = [| "Forecasters recorded {n} millimetres of rain in a single day."
                            "Gauges measured {n} millimetres of rainfall within twenty four hours." |]
                Range = (20, 180)
                Summary = "{who} flooded {where} after {n}mm of rain fell in a day." }
              { Key = [| "Powerful gusts from {who} brought down trees and damaged roofs overnight."
                         "{who} battered the region with violent winds through the night." |]
                Number = [| "Gusts of up to {n} miles per hour were measured on exposed hills."
                            "The strongest gust reached {n} miles per hour." |]
                Range = (50, 110)
                Summary = "{who} hit {where} with {n}mph winds, toppling trees and damaging roofs." }
              { Key = [| "{who} brought heavy snow, closing schools and disrupting travel."
                         "A blanket of snow from {who} left drivers stranded and schools shut." |]
                Number = [| "Drifts reached {n} centimetres deep in places."
                            "Snow lay {n} centimetres deep on higher ground." |]
                Range = (5, 90)
                Summary = "Schools closed in {where} as {who} left snow {n}cm deep." }
              { Key = [| "{who} drove high tides over sea defences along the coast."
                         "Coastal communities were warned to stay away from the shore as {who} arrived." |]
                Number = [| "Waves up to {n} feet high were reported by the coastguard."
                            "Lifeboat crews saw waves reaching {n} feet." |]
                Range = (8, 50)
                Summary = "{who} sent {n}ft waves crashing over the sea wall at {where}." }
              { Key = [| "Thousands of homes lost electricity as {who} swept across the region."
                         "Engineers worked through the night to restore supplies cut by {who}." |]
                Number = [| "The network operator said {n} thousand properties were affected."
                            "At the peak {n} thousand homes were without power." |]
                Range = (2, 250)
                Summary = "{who} cut power to {n} thousand homes around {where}." } |]
         Place =
           [| "The worst of the damage was reported in and around {where}."
              "Emergency services in {where} received hundreds of calls."
              "Residents of {where} were among the hardest hit." |]
         Filler =
           [| "The national forecaster issued an amber warning for much of the country."
              "Drivers were urged to avoid all but essential journeys."
              "Train operators cancelled a number of services as a precaution."
              "Councils opened rest centres for people forced to leave their homes."
              "Conditions are expected to settle down by the end of the week."
              "Farmers said the weather had made it impossible to work the fields."
              "Volunteers handed out sandbags to households in low lying streets."
              "Meteorologists said such events were becoming more frequent."
              "Schools in some districts told pupils to stay at home as a precaution." |]
         Background =
           [| "A year ago {who2} caused {n2} millimetres of rain to fall on {where2}."
              "Forecasters compared the conditions with {who2}, which left {n2} thousand homes in {where2} without power." |] }
       { Name = "culture"
         Agents =
           [| "the Paper Lanterns"; "singer Mara Quell"; "the Velvet Tide"; "director Jonas Ferre"; "author Leila Brandt"
              "the Copper Street Players"; "painter Otto Lindqvist"; "the Northern Youth Orchestra"; "composer Ada Welling"
              "comedian Sam Okoro" |]
         Events =
           [| { Key = [| "{who} collected a major prize at a ceremony celebrating the best new work of the year."
                         "Judges named {who} as this year's overall winner at a glittering awards evening." |]
                Number = [| "The panel chose the winner from a shortlist of {n} entries."
                            "In total {n} works were considered for the honour." |]
                Range = (5, 80)
                Summary = "{who} beat {n} other contenders to take a top arts award in {where}." }
              { Key = [| "{who} announced a long run of live dates for next spring."
                         "Fans of {who} rushed to secure tickets after a new tour was revealed." |]
                Number = [| "Tickets for all {n} shows go on sale on Friday."
                            "The schedule includes {n} performances in total." |]
                Range = (6, 60)
                Summary = "{who} will play {n} shows on a tour that opens in {where}." }
              { Key = [| "A new exhibition devoted to the work of {who} opened its doors this week."
                         "A gallery retrospective celebrating {who} has welcomed its first visitors." |]
                Number = [| "It brings together {n} pieces, many never shown before."
                            "Curators have gathered {n} items from private and public collections." |]
                Range = (20, 300)
                Summary = "{n} works by {who} are now on display at a show in {where}." }
              { Key = [| "The latest release from {who} has become one of the fastest sellers of the year."
                         "Demand for the new record by {who} has outstripped all expectations." |]
                Number = [| "More than {n} thousand copies were sold in the first week."
                            "Retailers reported {n} thousand sales within seven days." |]
                Range = (5, 400)
                Summary = "{who} sold {n} thousand copies in a week, the label said in {where}." }
              { Key = [| "{who} will headline a weekend festival celebrating local talent."
                         "Festival organisers have confirmed {who} as the main attraction this summer." |]
                Number = [| "Organisers expect {n} thousand visitors over the two days."
                            "Around {n} thousand people are expected to attend." |]
                Range = (3, 90)
                Summary = "{who} will top the bill at a {where} festival expecting {n} thousand visitors." } |]
         Place =
           [| "The event took place at a theatre in {where}."
              "The venue in {where} was packed for the occasion."
              "It was all announced at a cultural centre in {where}." |]
         Filler =
           [| "Critics have described the work as bold, thoughtful and often very funny."
              "The arts council said attendance at live events had recovered strongly."
              "Rehearsals took place over several months in a converted warehouse."
              "Audiences responded with a long standing ovation on the opening night."
              "The production features costumes made by students from a local college."
              "Streaming services have shown interest in the rights to the project."
              "Younger audiences in particular have embraced the new style."
              "A documentary about the making of the piece is in preparation."
              "Local businesses reported a welcome boost from visiting fans." |]
         Background =
           [| "Last year {who2} drew {n2} thousand people to a venue in {where2}."
              "Earlier this season {who2} performed {n2} times at a small hall in {where2}." |] } |]

/// The topic names, which are the examples' labels.
let topicNames : string[] = topics |> Array.map (fun t -> t.Name)

let private capitalise (s: string) =
    if s.Length = 0 || Char.IsUpper s[0] then s else string (Char.ToUpperInvariant s[0]) + s.Substring 1

let private fill (template: string) (slots: (string * string) list) =
    let sb = StringBuilder(template)
    for k, v in slots do sb.Replace("{" + k + "}", v) |> ignore
    capitalise (sb.ToString())

let private wordCount (s: string) = s.Split(' ', StringSplitOptions.RemoveEmptyEntries).Length

/// Picks `k` distinct items (k <= items.Length).
let private sample (rng: Rng) (k: int) (items: 'a[]) : 'a list =
    let pool = Array.copy items
    [ for i in 0 .. k - 1 do
        let j = i + rng.Below(pool.Length - i)
        let t = pool[i]
        pool[i] <- pool[j]
        pool[j] <- t
        yield pool[i] ]

let private shuffle (rng: Rng) (items: 'a list) : 'a list =
    let a = List.toArray items
    for i in a.Length - 1 .. -1 .. 1 do
        let j = rng.Below(i + 1)
        let t = a[i]
        a[i] <- a[j]
        a[j] <- t
    List.ofArray a

/// Example `index` of the corpus `cfg` describes. Examples are independent: example i is the same in
/// every corpus with the same seed.
let example (cfg: CorpusConfig) (index: int) : Example =
    let rng = Rng.For(cfg.Seed, index)
    let topic = rng.Pick topics
    let ev = rng.Pick topic.Events
    let who = rng.Pick topic.Agents
    let where = rng.Pick places
    let n = rng.Range ev.Range
    let slots = [ "who", who; "where", where; "n", string n ]
    let facts =
        [ fill (rng.Pick ev.Key) slots
          fill (rng.Pick ev.Number) slots
          fill (rng.Pick topic.Place) slots ]
    let background =
        if rng.Unit() < cfg.HardDistractorRate then
            let who2 = topic.Agents |> Array.filter ((<>) who) |> rng.Pick
            let where2 = places |> Array.filter ((<>) where) |> rng.Pick
            let lo, hi = ev.Range
            let n2 = Seq.initInfinite (fun _ -> rng.Range(lo, hi)) |> Seq.find ((<>) n)
            [ fill (rng.Pick topic.Background) [ "who2", who2; "where2", where2; "n2", string n2 ] ]
        else []
    // Distractors in the order they would be added; the length adjustment takes a prefix.
    let pool = Array.append topic.Filler common
    let distractors = sample rng pool.Length pool
    let target = rng.Range(cfg.MinSentences, cfg.MaxSentences)
    let fixedCount = facts.Length + background.Length
    let words (k: int) = (facts @ background @ List.take k distractors) |> List.sumBy wordCount
    let mutable k = min distractors.Length (max 0 (target - fixedCount))
    while words k < cfg.MinWords && k < distractors.Length && fixedCount + k < cfg.MaxSentences do k <- k + 1
    while words k > cfg.MaxWords && k > 0 && fixedCount + k > cfg.MinSentences do k <- k - 1
    let sentences = shuffle rng (facts @ background @ List.take k distractors)
    { Id = sprintf "synth-%d-%06d" cfg.Seed index
      Document = String.Join(" ", sentences)
      Summary = fill ev.Summary slots
      Label = Some topic.Name }

/// `count` examples of the corpus `cfg` describes, starting at example `first`.
let generateWith (cfg: CorpusConfig) (first: int) (count: int) : Example[] =
    match CorpusConfig.validate cfg with
    | [] -> ()
    | problems -> invalidArg "cfg" ("invalid corpus config: " + String.Join("; ", problems))
    if first < 0 || count < 0 then invalidArg "count" (sprintf "expected first >= 0 and count >= 0, got %d and %d" first count)
    Array.init count (fun i -> example cfg (first + i))

/// The first `n` examples of the default corpus with seed `seed`.
let generate (seed: int) (n: int) : Example[] =
    generateWith { CorpusConfig.defaults with Seed = seed } 0 n

/// Train, validation and test examples.
type Splits =
    { Train: Example[]
      Valid: Example[]
      Test: Example[] }

/// Disjoint consecutive ranges of one corpus: train first, then validation, then test.
let splits (cfg: CorpusConfig) : Splits =
    { Train = generateWith cfg 0 cfg.TrainSize
      Valid = generateWith cfg cfg.TrainSize cfg.ValidSize
      Test = generateWith cfg (cfg.TrainSize + cfg.ValidSize) cfg.TestSize }
