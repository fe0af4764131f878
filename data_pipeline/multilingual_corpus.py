"""A multilingual test corpus of real sentences, with planted exact copies, near-duplicates and junk.

``SENTENCES[lang]`` holds 42 natural sentences per language (en, de, fr, es, ru, zh, ja, ko, ar) on everyday
topics, written for this corpus (no network, no licence question). :func:`make_corpus` recombines them
deterministically (``seed``) into paragraph-like documents and returns every document with its ground
truth:

- ``unique``: a document of 6-12 sentences in 1-3 paragraphs. Any two documents of one language are
  *unrelated*: they share at most a quarter of their sentences (sentence-set Jaccard <= 1/4, enforced by
  rejection), which keeps their shingle Jaccard near 0.2 at most, far below the LSH threshold.
- ``base``: a unique document that has a planted partner (``exact`` or ``near``); ``base`` names it.
- ``exact``: a byte-identical copy of its base (under another id and url).
- ``near``: its base after random token edits (substitution by another word of the language, insertion,
  deletion; a token is a word, or a character in zh/ja) until the shingle Jaccard
  J = |S(a) & S(b)| / |S(a) | S(b)| of :func:`data_pipeline.minhash.shingle_jaccard` (word 5-grams, character
  n-grams for spaceless scripts; the real MinHasher's definition) falls to a target drawn uniformly from
  ``near_jaccard`` (default 0.8-0.95); the measured J is recorded (never the target).
- ``junk``: low-quality documents every language's cleaning must remove: a single sentence (too short),
  one sentence repeated on ten lines, two sentences repeated six times in one paragraph.

Each document also gets ``url`` (a per-language site under ``example.*``) and ``date`` metadata, so the
corpus exercises metadata passthrough too. ``write_jsonl`` writes it as ingest input.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.minhash import CHAR_NGRAM, shingle_tokens

LANGUAGES = ("en", "de", "fr", "es", "ru", "zh", "ja", "ko", "ar")
_JOIN = {"zh": "", "ja": ""}  # sentences of spaceless scripts follow each other without a space
_TLD = {"en": "com", "de": "de", "fr": "fr", "es": "es", "ru": "ru", "zh": "cn", "ja": "jp", "ko": "kr", "ar": "eg"}

_TEXT = {
    "en": """
The morning train to the city was late again, so most of the passengers waited on the cold platform with their coffee.
My grandmother grew tomatoes, beans and potatoes in a small garden behind the house for more than forty years.
After the heavy rain last night, the river rose quickly and flooded several fields near the old bridge.
The museum will open a new exhibition about ancient trade routes between Europe and Asia next spring.
She learned to play the piano as a child, but she only started writing her own music at university.
Doctors recommend that adults sleep at least seven hours a night and take a short walk every day.
The small bakery on the corner sells fresh bread every morning, and by noon the shelves are usually empty.
Scientists have discovered that some birds can recognise the faces of people who have fed them before.
We spent our summer holiday in a quiet village in the mountains, far away from the noise of the city.
The city council decided to build more bicycle lanes and to reduce the number of parking spaces in the centre.
If you want to learn a foreign language quickly, you should speak it every day, even if you make mistakes.
The football match was cancelled because of the storm, and the fans were sent home before the kick-off.
Our neighbours adopted a young dog from the shelter, and now the children take it to the park after school.
The price of vegetables has risen sharply this year because the dry summer destroyed much of the harvest.
He fixed the old bicycle himself, replacing the chain, the brakes and both tyres in a single afternoon.
Many young people move to large cities to study or work, while the villages slowly lose their inhabitants.
The library offers free courses for older people who want to learn how to use computers and smartphones.
During the night the temperature fell below zero, and in the morning the lake was covered with thin ice.
The company announced that it will open a new factory next year and hire about three hundred workers.
My brother has been working as a nurse in the children's hospital for almost ten years now.
The recipe is simple: fry the onions in butter, add the rice and the broth, and stir slowly for twenty minutes.
Tourists often visit the castle in the summer, but in winter the rooms are closed and the gardens are quiet.
The teacher asked the students to read the first three chapters of the novel before the next lesson.
Electric cars are becoming cheaper, but many drivers still worry about the distance they can travel on one charge.
In the evening the whole family gathered around the table to eat soup and talk about the day.
The old lighthouse on the island has been turned into a small hotel with only six rooms.
Farmers in the region have started to plant crops that need less water because the summers are getting hotter.
The concert lasted almost three hours, and the audience asked the band to play two more songs at the end.
When I was young, we did not have a television, so we listened to the radio and read books in the evenings.
The researchers measured the air quality in twenty schools and found that many classrooms were poorly ventilated.
The bus driver stopped and waited patiently while the old man climbed the steps with his heavy bag.
Our office moved to a new building near the harbour, and now I can see the ships from my desk.
The festival takes place every year at the end of August and attracts visitors from all over the country.
She wrote a long letter to her friend abroad and described the new house, the garden and the neighbours.
The mountain path was steep and narrow, so we walked slowly and stopped often to look at the valley below.
A good night's sleep, regular meals and some exercise are often more helpful than expensive vitamins.
The shop closed after sixty years because the owner retired and none of his children wanted to take it over.
In the forest we found mushrooms, wild berries and the tracks of a deer in the soft ground.
The government plans to invest more money in public transport and in the renovation of old schools.
My friend cooked a delicious dinner for us, with fish from the market and vegetables from her own garden.
The children built a snowman in front of the school and gave him a carrot for a nose and an old hat.
The engineers tested the new bridge for several weeks before it was finally opened to traffic.
""",
    "de": """
Der Morgenzug in die Stadt hatte wieder Verspätung, also warteten die meisten Fahrgäste mit ihrem Kaffee auf dem kalten Bahnsteig.
Meine Großmutter hat mehr als vierzig Jahre lang Tomaten, Bohnen und Kartoffeln in einem kleinen Garten hinter dem Haus angebaut.
Nach dem starken Regen der letzten Nacht stieg der Fluss schnell an und überschwemmte mehrere Felder in der Nähe der alten Brücke.
Das Museum eröffnet im nächsten Frühjahr eine neue Ausstellung über die alten Handelswege zwischen Europa und Asien.
Sie hat als Kind Klavier spielen gelernt, aber erst an der Universität hat sie angefangen, ihre eigene Musik zu schreiben.
Ärzte empfehlen, dass Erwachsene mindestens sieben Stunden pro Nacht schlafen und jeden Tag einen kurzen Spaziergang machen.
Die kleine Bäckerei an der Ecke verkauft jeden Morgen frisches Brot, und gegen Mittag sind die Regale meistens leer.
Wissenschaftler haben entdeckt, dass manche Vögel die Gesichter von Menschen erkennen können, die sie früher gefüttert haben.
Wir haben unseren Sommerurlaub in einem ruhigen Dorf in den Bergen verbracht, weit weg vom Lärm der Stadt.
Der Stadtrat hat beschlossen, mehr Radwege zu bauen und die Zahl der Parkplätze im Zentrum zu verringern.
Wer eine Fremdsprache schnell lernen will, sollte sie jeden Tag sprechen, auch wenn er dabei Fehler macht.
Das Fußballspiel wurde wegen des Sturms abgesagt, und die Fans wurden noch vor dem Anpfiff nach Hause geschickt.
Unsere Nachbarn haben einen jungen Hund aus dem Tierheim geholt, und jetzt gehen die Kinder nach der Schule mit ihm in den Park.
Der Preis für Gemüse ist in diesem Jahr stark gestiegen, weil der trockene Sommer einen großen Teil der Ernte zerstört hat.
Er hat das alte Fahrrad selbst repariert und an einem einzigen Nachmittag die Kette, die Bremsen und beide Reifen ersetzt.
Viele junge Menschen ziehen zum Studieren oder Arbeiten in große Städte, während die Dörfer langsam ihre Einwohner verlieren.
Die Bibliothek bietet kostenlose Kurse für ältere Menschen an, die lernen möchten, wie man Computer und Smartphones benutzt.
In der Nacht fiel die Temperatur unter null, und am Morgen war der See mit einer dünnen Eisschicht bedeckt.
Das Unternehmen hat angekündigt, im nächsten Jahr eine neue Fabrik zu eröffnen und etwa dreihundert Arbeiter einzustellen.
Mein Bruder arbeitet jetzt seit fast zehn Jahren als Krankenpfleger im Kinderkrankenhaus.
Das Rezept ist einfach: Die Zwiebeln in Butter anbraten, den Reis und die Brühe dazugeben und zwanzig Minuten langsam rühren.
Im Sommer besuchen viele Touristen das Schloss, aber im Winter sind die Räume geschlossen und die Gärten ganz still.
Die Lehrerin bat die Schüler, vor der nächsten Stunde die ersten drei Kapitel des Romans zu lesen.
Elektroautos werden billiger, aber viele Fahrer machen sich immer noch Sorgen darüber, wie weit sie mit einer Ladung kommen.
Am Abend versammelte sich die ganze Familie um den Tisch, um Suppe zu essen und über den Tag zu sprechen.
Der alte Leuchtturm auf der Insel wurde in ein kleines Hotel mit nur sechs Zimmern umgebaut.
Die Bauern in der Region bauen inzwischen Pflanzen an, die weniger Wasser brauchen, weil die Sommer immer heißer werden.
Das Konzert dauerte fast drei Stunden, und am Ende bat das Publikum die Band, noch zwei Lieder zu spielen.
Als ich jung war, hatten wir keinen Fernseher, also hörten wir abends Radio und lasen Bücher.
Die Forscher haben die Luftqualität in zwanzig Schulen gemessen und festgestellt, dass viele Klassenzimmer schlecht belüftet waren.
Der Busfahrer hielt an und wartete geduldig, während der alte Mann mit seiner schweren Tasche die Stufen hinaufstieg.
Unser Büro ist in ein neues Gebäude am Hafen umgezogen, und jetzt kann ich von meinem Schreibtisch aus die Schiffe sehen.
Das Fest findet jedes Jahr Ende August statt und zieht Besucher aus dem ganzen Land an.
Sie schrieb ihrer Freundin im Ausland einen langen Brief und beschrieb das neue Haus, den Garten und die Nachbarn.
Der Bergpfad war steil und schmal, deshalb gingen wir langsam und blieben oft stehen, um ins Tal hinunterzuschauen.
Guter Schlaf, regelmäßige Mahlzeiten und etwas Bewegung helfen oft mehr als teure Vitamine.
Das Geschäft schloss nach sechzig Jahren, weil der Besitzer in Rente ging und keines seiner Kinder es übernehmen wollte.
Im Wald fanden wir Pilze, wilde Beeren und die Spuren eines Rehs im weichen Boden.
Die Regierung plant, mehr Geld in den öffentlichen Nahverkehr und in die Renovierung alter Schulen zu investieren.
Meine Freundin hat uns ein köstliches Abendessen gekocht, mit Fisch vom Markt und Gemüse aus ihrem eigenen Garten.
Die Kinder bauten vor der Schule einen Schneemann und gaben ihm eine Karotte als Nase und einen alten Hut.
Die Ingenieure haben die neue Brücke mehrere Wochen lang getestet, bevor sie endlich für den Verkehr freigegeben wurde.
""",
    "fr": """
Le train du matin pour la ville avait encore du retard, alors la plupart des voyageurs attendaient sur le quai froid avec leur café.
Ma grand-mère a cultivé des tomates, des haricots et des pommes de terre dans un petit jardin derrière la maison pendant plus de quarante ans.
Après la forte pluie de la nuit dernière, la rivière est montée rapidement et a inondé plusieurs champs près du vieux pont.
Le musée ouvrira au printemps prochain une nouvelle exposition sur les anciennes routes commerciales entre l'Europe et l'Asie.
Elle a appris à jouer du piano quand elle était enfant, mais elle n'a commencé à écrire sa propre musique qu'à l'université.
Les médecins recommandent aux adultes de dormir au moins sept heures par nuit et de faire une courte promenade chaque jour.
La petite boulangerie du coin vend du pain frais tous les matins, et vers midi les étagères sont généralement vides.
Des scientifiques ont découvert que certains oiseaux peuvent reconnaître le visage des personnes qui les ont déjà nourris.
Nous avons passé nos vacances d'été dans un village tranquille à la montagne, loin du bruit de la ville.
Le conseil municipal a décidé de construire davantage de pistes cyclables et de réduire le nombre de places de parking dans le centre.
Si vous voulez apprendre rapidement une langue étrangère, vous devez la parler tous les jours, même si vous faites des erreurs.
Le match de football a été annulé à cause de la tempête, et les supporters ont été renvoyés chez eux avant le coup d'envoi.
Nos voisins ont adopté un jeune chien au refuge, et maintenant les enfants l'emmènent au parc après l'école.
Le prix des légumes a fortement augmenté cette année parce que l'été sec a détruit une grande partie de la récolte.
Il a réparé lui-même le vieux vélo et a remplacé la chaîne, les freins et les deux pneus en un seul après-midi.
Beaucoup de jeunes partent dans les grandes villes pour étudier ou travailler, tandis que les villages perdent peu à peu leurs habitants.
La bibliothèque propose des cours gratuits aux personnes âgées qui veulent apprendre à utiliser un ordinateur et un smartphone.
Pendant la nuit, la température est descendue sous zéro, et le matin le lac était couvert d'une fine couche de glace.
L'entreprise a annoncé qu'elle ouvrira une nouvelle usine l'année prochaine et qu'elle embauchera environ trois cents ouvriers.
Mon frère travaille comme infirmier à l'hôpital pour enfants depuis presque dix ans.
La recette est simple : faites revenir les oignons dans du beurre, ajoutez le riz et le bouillon, puis remuez doucement pendant vingt minutes.
Les touristes visitent souvent le château en été, mais en hiver les salles sont fermées et les jardins sont silencieux.
Le professeur a demandé aux élèves de lire les trois premiers chapitres du roman avant le prochain cours.
Les voitures électriques deviennent moins chères, mais beaucoup de conducteurs s'inquiètent encore de la distance qu'ils peuvent parcourir avec une seule charge.
Le soir, toute la famille se réunissait autour de la table pour manger de la soupe et parler de la journée.
Le vieux phare de l'île a été transformé en un petit hôtel qui ne compte que six chambres.
Les agriculteurs de la région ont commencé à planter des cultures qui demandent moins d'eau, car les étés sont de plus en plus chauds.
Le concert a duré presque trois heures, et à la fin le public a demandé au groupe de jouer encore deux chansons.
Quand j'étais jeune, nous n'avions pas de télévision, alors le soir nous écoutions la radio et nous lisions des livres.
Les chercheurs ont mesuré la qualité de l'air dans vingt écoles et ont constaté que beaucoup de salles de classe étaient mal aérées.
Le chauffeur a arrêté le bus et a attendu patiemment pendant que le vieil homme montait les marches avec son sac lourd.
Notre bureau a déménagé dans un nouveau bâtiment près du port, et maintenant je peux voir les bateaux depuis ma table de travail.
Le festival a lieu chaque année à la fin du mois d'août et attire des visiteurs de tout le pays.
Elle a écrit une longue lettre à son amie à l'étranger pour lui décrire la nouvelle maison, le jardin et les voisins.
Le sentier de montagne était raide et étroit, alors nous avons marché lentement en nous arrêtant souvent pour regarder la vallée.
Un bon sommeil, des repas réguliers et un peu d'exercice sont souvent plus utiles que des vitamines coûteuses.
Le magasin a fermé après soixante ans parce que le propriétaire a pris sa retraite et qu'aucun de ses enfants ne voulait le reprendre.
Dans la forêt, nous avons trouvé des champignons, des baies sauvages et les traces d'un chevreuil dans la terre molle.
Le gouvernement prévoit d'investir davantage dans les transports publics et dans la rénovation des vieilles écoles.
Mon amie nous a préparé un délicieux dîner, avec du poisson du marché et des légumes de son propre jardin.
Les enfants ont construit un bonhomme de neige devant l'école et lui ont donné une carotte pour le nez et un vieux chapeau.
Les ingénieurs ont testé le nouveau pont pendant plusieurs semaines avant de l'ouvrir enfin à la circulation.
""",
    "es": """
El tren de la mañana hacia la ciudad volvió a llegar tarde, así que la mayoría de los pasajeros esperaron en el andén frío con su café.
Mi abuela cultivó tomates, judías y patatas en un pequeño huerto detrás de la casa durante más de cuarenta años.
Después de la fuerte lluvia de anoche, el río creció rápidamente e inundó varios campos cerca del puente viejo.
El museo abrirá la próxima primavera una nueva exposición sobre las antiguas rutas comerciales entre Europa y Asia.
Aprendió a tocar el piano de niña, pero no empezó a escribir su propia música hasta que llegó a la universidad.
Los médicos recomiendan que los adultos duerman al menos siete horas por noche y que den un paseo corto todos los días.
La pequeña panadería de la esquina vende pan fresco todas las mañanas, y a mediodía las estanterías suelen estar vacías.
Los científicos han descubierto que algunos pájaros pueden reconocer la cara de las personas que les han dado de comer antes.
Pasamos las vacaciones de verano en un pueblo tranquilo de la montaña, lejos del ruido de la ciudad.
El ayuntamiento decidió construir más carriles para bicicletas y reducir el número de plazas de aparcamiento en el centro.
Si quieres aprender un idioma extranjero rápidamente, tienes que hablarlo todos los días, aunque cometas errores.
El partido de fútbol se suspendió por la tormenta, y los aficionados tuvieron que volver a casa antes del comienzo.
Nuestros vecinos adoptaron un perro joven del refugio, y ahora los niños lo llevan al parque después del colegio.
El precio de las verduras ha subido mucho este año porque el verano seco destruyó gran parte de la cosecha.
Él mismo arregló la bicicleta vieja y cambió la cadena, los frenos y las dos ruedas en una sola tarde.
Muchos jóvenes se mudan a las grandes ciudades para estudiar o trabajar, mientras los pueblos pierden poco a poco a sus habitantes.
La biblioteca ofrece cursos gratuitos para personas mayores que quieren aprender a usar el ordenador y el teléfono móvil.
Durante la noche la temperatura bajó de cero, y por la mañana el lago estaba cubierto de una fina capa de hielo.
La empresa anunció que abrirá una nueva fábrica el año que viene y que contratará a unos trescientos trabajadores.
Mi hermano trabaja como enfermero en el hospital infantil desde hace casi diez años.
La receta es sencilla: se fríe la cebolla en mantequilla, se añaden el arroz y el caldo y se remueve despacio durante veinte minutos.
Los turistas suelen visitar el castillo en verano, pero en invierno las salas están cerradas y los jardines están en silencio.
La profesora pidió a los alumnos que leyeran los tres primeros capítulos de la novela antes de la próxima clase.
Los coches eléctricos son cada vez más baratos, pero muchos conductores todavía se preocupan por la distancia que pueden recorrer con una sola carga.
Por la noche toda la familia se reunía alrededor de la mesa para comer sopa y hablar del día.
El viejo faro de la isla se ha convertido en un pequeño hotel con solo seis habitaciones.
Los agricultores de la región han empezado a sembrar cultivos que necesitan menos agua, porque los veranos son cada vez más calurosos.
El concierto duró casi tres horas, y al final el público pidió al grupo que tocara dos canciones más.
Cuando yo era joven no teníamos televisión, así que por las noches escuchábamos la radio y leíamos libros.
Los investigadores midieron la calidad del aire en veinte escuelas y comprobaron que muchas aulas estaban mal ventiladas.
El conductor detuvo el autobús y esperó con paciencia mientras el anciano subía los escalones con su bolsa pesada.
Nuestra oficina se trasladó a un edificio nuevo junto al puerto, y ahora puedo ver los barcos desde mi mesa.
El festival se celebra todos los años a finales de agosto y atrae a visitantes de todo el país.
Escribió una carta larga a su amiga en el extranjero y le describió la casa nueva, el jardín y los vecinos.
El sendero de la montaña era empinado y estrecho, así que caminamos despacio y nos paramos a menudo para mirar el valle.
Dormir bien, comer a horas regulares y hacer algo de ejercicio suele ayudar más que las vitaminas caras.
La tienda cerró después de sesenta años porque el dueño se jubiló y ninguno de sus hijos quiso hacerse cargo de ella.
En el bosque encontramos setas, moras silvestres y las huellas de un ciervo en la tierra blanda.
El gobierno tiene previsto invertir más dinero en el transporte público y en la renovación de las escuelas antiguas.
Mi amiga nos preparó una cena deliciosa, con pescado del mercado y verduras de su propio huerto.
Los niños hicieron un muñeco de nieve delante de la escuela y le pusieron una zanahoria como nariz y un sombrero viejo.
Los ingenieros probaron el nuevo puente durante varias semanas antes de abrirlo por fin al tráfico.
""",
    "ru": """
Утренний поезд в город снова опоздал, поэтому большинство пассажиров ждали на холодной платформе со своим кофе.
Моя бабушка больше сорока лет выращивала помидоры, фасоль и картофель в маленьком огороде за домом.
После сильного дождя прошлой ночью река быстро поднялась и затопила несколько полей возле старого моста.
Следующей весной музей откроет новую выставку о древних торговых путях между Европой и Азией.
Она научилась играть на пианино в детстве, но начала писать собственную музыку только в университете.
Врачи советуют взрослым спать не меньше семи часов в сутки и каждый день совершать короткую прогулку.
Маленькая пекарня на углу каждое утро продаёт свежий хлеб, и к обеду полки обычно уже пустые.
Учёные обнаружили, что некоторые птицы могут узнавать лица людей, которые раньше их кормили.
Мы провели летний отпуск в тихой деревне в горах, далеко от городского шума.
Городской совет решил построить больше велосипедных дорожек и сократить число парковочных мест в центре.
Если вы хотите быстро выучить иностранный язык, нужно говорить на нём каждый день, даже если вы делаете ошибки.
Футбольный матч отменили из-за шторма, и болельщиков отправили домой ещё до начала игры.
Наши соседи взяли из приюта молодую собаку, и теперь дети после школы гуляют с ней в парке.
В этом году цены на овощи сильно выросли, потому что засушливое лето уничтожило большую часть урожая.
Он сам починил старый велосипед и за один день заменил цепь, тормоза и обе шины.
Многие молодые люди переезжают в большие города, чтобы учиться или работать, а деревни постепенно теряют своих жителей.
Библиотека предлагает бесплатные курсы для пожилых людей, которые хотят научиться пользоваться компьютером и смартфоном.
Ночью температура опустилась ниже нуля, и утром озеро было покрыто тонким льдом.
Компания объявила, что в следующем году откроет новый завод и наймёт около трёхсот рабочих.
Мой брат уже почти десять лет работает медбратом в детской больнице.
Рецепт простой: обжарьте лук на сливочном масле, добавьте рис и бульон и медленно помешивайте двадцать минут.
Летом туристы часто посещают замок, но зимой залы закрыты, а в садах стоит тишина.
Учительница попросила учеников прочитать первые три главы романа до следующего урока.
Электромобили становятся дешевле, но многие водители всё ещё беспокоятся о том, сколько они смогут проехать на одной зарядке.
Вечером вся семья собиралась за столом, чтобы поесть супа и поговорить о прошедшем дне.
Старый маяк на острове превратили в маленькую гостиницу всего на шесть номеров.
Фермеры в регионе начали сажать культуры, которым нужно меньше воды, потому что лето становится всё жарче.
Концерт длился почти три часа, и в конце публика попросила группу сыграть ещё две песни.
Когда я был молодым, у нас не было телевизора, поэтому по вечерам мы слушали радио и читали книги.
Исследователи измерили качество воздуха в двадцати школах и выяснили, что многие классы плохо проветриваются.
Водитель остановил автобус и терпеливо ждал, пока старик поднимался по ступенькам со своей тяжёлой сумкой.
Наш офис переехал в новое здание у порта, и теперь я вижу корабли прямо со своего рабочего места.
Фестиваль проходит каждый год в конце августа и привлекает гостей со всей страны.
Она написала длинное письмо подруге за границей и описала новый дом, сад и соседей.
Горная тропа была крутой и узкой, поэтому мы шли медленно и часто останавливались, чтобы посмотреть на долину.
Хороший сон, регулярное питание и немного физической нагрузки часто помогают больше, чем дорогие витамины.
Магазин закрылся через шестьдесят лет, потому что владелец ушёл на пенсию, а никто из его детей не захотел продолжать дело.
В лесу мы нашли грибы, дикие ягоды и следы оленя на мягкой земле.
Правительство планирует вложить больше денег в общественный транспорт и в ремонт старых школ.
Моя подруга приготовила для нас вкусный ужин из рыбы с рынка и овощей со своего огорода.
Дети слепили снеговика перед школой и дали ему морковку вместо носа и старую шляпу.
Инженеры несколько недель испытывали новый мост, прежде чем его наконец открыли для движения.
""",
    "zh": """
早上去城里的火车又晚点了，大多数乘客只好端着咖啡在寒冷的站台上等待。
我奶奶在房子后面的小菜园里种了四十多年的西红柿、豆角和土豆。
昨天夜里下了一场大雨，河水迅速上涨，淹没了老桥附近的好几块田地。
博物馆明年春天将举办一个新展览，介绍欧洲和亚洲之间古老的贸易路线。
她小时候学过弹钢琴，但直到上了大学才开始自己写曲子。
医生建议成年人每天晚上至少睡七个小时，并且每天出去散散步。
街角那家小面包店每天早上都卖新鲜面包，一到中午货架上通常就空了。
科学家发现，有些鸟能够认出以前喂过它们的人的脸。
我们在山里一个安静的小村子里度过了暑假，远离了城市的喧嚣。
市议会决定修建更多的自行车道，并减少市中心的停车位。
如果你想快速学会一门外语，就应该每天都说，即使说错了也没关系。
由于暴风雨，足球比赛被取消了，球迷们在开球之前就被送回了家。
我们的邻居从收容所领养了一只小狗，现在孩子们放学后都会带它去公园。
今年蔬菜价格大幅上涨，因为干旱的夏天毁掉了大部分收成。
他自己修好了那辆旧自行车，一个下午就换了链条、刹车和两个轮胎。
许多年轻人搬到大城市去读书或工作，而村子里的人口却在慢慢减少。
图书馆为想学习使用电脑和智能手机的老年人开设了免费课程。
夜里气温降到了零度以下，第二天早上湖面上结了一层薄薄的冰。
这家公司宣布明年将开设一座新工厂，并招聘大约三百名工人。
我哥哥在儿童医院当护士已经快十年了。
做法很简单：先用黄油把洋葱炒香，再加入米饭和高汤，慢慢搅拌二十分钟。
夏天经常有游客来参观城堡，可是到了冬天，房间都关着，花园里也很安静。
老师让学生们在下节课之前读完这本小说的前三章。
电动汽车越来越便宜了，但很多司机仍然担心充一次电能跑多远。
晚上全家人围坐在桌子旁，一边喝汤一边聊着这一天发生的事情。
岛上那座古老的灯塔已经被改建成一家只有六个房间的小旅馆。
由于夏天越来越热，这个地区的农民开始种植需水量较少的作物。
音乐会持续了将近三个小时，最后观众又请乐队多唱了两首歌。
我小时候家里没有电视，所以晚上我们就听收音机、看书。
研究人员测量了二十所学校的空气质量，发现很多教室通风不良。
司机把车停下来，耐心地等着那位老人提着沉重的袋子走上台阶。
我们的办公室搬到了港口附近的一栋新楼里，现在我坐在桌前就能看到船。
这个节日每年八月底举行，吸引了来自全国各地的游客。
她给在国外的朋友写了一封长信，描述了新房子、花园和邻居们。
山路又陡又窄，所以我们走得很慢，还经常停下来欣赏山下的山谷。
良好的睡眠、规律的饮食和适量的运动往往比昂贵的维生素更有用。
这家商店开了六十年后关门了，因为店主退休了，而他的孩子们都不愿意接手。
我们在森林里找到了蘑菇和野生浆果，还在松软的地上发现了鹿的脚印。
政府计划在公共交通和老旧学校的翻修上投入更多资金。
我的朋友给我们做了一顿美味的晚餐，有市场上买的鱼，还有她自己菜园里种的蔬菜。
孩子们在学校门口堆了一个雪人，用胡萝卜做鼻子，还给它戴了一顶旧帽子。
工程师们对新桥进行了几个星期的测试，最后才正式通车。
""",
    "ja": """
町へ向かう朝の電車がまた遅れたので、ほとんどの乗客はコーヒーを持って寒いホームで待っていた。
祖母は四十年以上、家の裏の小さな畑でトマトや豆やじゃがいもを育てていた。
昨夜の大雨で川の水位が急に上がり、古い橋の近くにある畑がいくつも水につかった。
博物館では来年の春、ヨーロッパとアジアを結んだ古い交易路についての新しい展示が始まる。
彼女は子どものころにピアノを習ったが、自分で曲を書き始めたのは大学に入ってからだった。
医者は、大人は毎晩少なくとも七時間は眠り、毎日少し散歩をするようにと勧めている。
角にある小さなパン屋は毎朝焼きたてのパンを売っていて、昼ごろには棚がたいてい空になる。
科学者たちは、一部の鳥が以前にえさをくれた人の顔を覚えていることを発見した。
私たちは夏休みを山の中の静かな村で過ごし、都会の騒がしさから離れてのんびりした。
市議会は自転車専用の道を増やし、中心部の駐車場を減らすことを決めた。
外国語を早く身につけたいなら、間違えてもいいので毎日話すようにしたほうがいい。
嵐のためにサッカーの試合は中止になり、ファンは試合開始の前に家へ帰された。
隣の家族は保護施設から子犬を引き取り、今では子どもたちが学校の帰りに公園へ連れて行っている。
今年は乾いた夏のせいで収穫の多くがだめになり、野菜の値段が大きく上がった。
彼は古い自転車を自分で直し、たった一日の午後でチェーンとブレーキと二本のタイヤを交換した。
多くの若者が勉強や仕事のために大きな都市へ移り、村の人口は少しずつ減っている。
図書館では、パソコンやスマートフォンの使い方を学びたいお年寄りのために無料の講座を開いている。
夜のうちに気温が氷点下まで下がり、朝には湖の表面が薄い氷におおわれていた。
その会社は来年新しい工場を開き、およそ三百人の従業員を雇うと発表した。
兄は子ども病院で看護師として働いて、もうすぐ十年になる。
作り方は簡単で、玉ねぎをバターで炒め、米とスープを加えて、二十分ほどゆっくり混ぜるだけだ。
夏には多くの観光客がお城を訪れるが、冬になると部屋は閉められ、庭もひっそりとしている。
先生は生徒たちに、次の授業までに小説の最初の三章を読んでおくように言った。
電気自動車は安くなってきたが、一回の充電でどこまで走れるのかを心配する運転手はまだ多い。
夕方になると家族みんながテーブルを囲み、スープを飲みながらその日の出来事を話した。
島の古い灯台は、部屋が六つしかない小さなホテルに生まれ変わった。
夏が年々暑くなっているため、この地方の農家は水をあまり必要としない作物を植え始めた。
コンサートは三時間近く続き、最後には観客がバンドにもう二曲演奏してほしいと頼んだ。
私が若いころは家にテレビがなかったので、夜はラジオを聞いたり本を読んだりしていた。
研究者たちは二十の学校で空気の質を測り、換気の悪い教室が多いことを突き止めた。
運転手はバスを止め、重いかばんを持ったおじいさんが階段を上るのを辛抱強く待っていた。
私たちの事務所は港の近くの新しいビルに移り、今では自分の机から船が見える。
この祭りは毎年八月の終わりに開かれ、全国から大勢の人が訪れる。
彼女は外国に住む友人に長い手紙を書き、新しい家や庭や近所の人たちのことを伝えた。
山道は急で狭かったので、私たちはゆっくり歩き、何度も立ち止まって下の谷をながめた。
よく眠り、決まった時間に食事をとり、適度に体を動かすことは、高いビタミン剤よりも役に立つことが多い。
その店は六十年続いたが、店主が引退し、子どもたちのだれも跡を継ごうとしなかったので閉店した。
森の中で私たちはきのこや野いちごを見つけ、やわらかい地面にはシカの足跡が残っていた。
政府は公共交通機関と古い学校の改修にもっとお金を使う計画を立てている。
友人は市場で買った魚と自分の畑でとれた野菜で、おいしい夕食を作ってくれた。
子どもたちは学校の前で雪だるまを作り、にんじんの鼻と古い帽子をつけてあげた。
技術者たちは新しい橋を何週間もかけて検査し、ようやく通行できるようにした。
""",
    "ko": """
시내로 가는 아침 기차가 또 늦어져서 대부분의 승객들은 커피를 들고 추운 승강장에서 기다렸다.
우리 할머니는 사십 년이 넘도록 집 뒤의 작은 텃밭에서 토마토와 콩과 감자를 기르셨다.
어젯밤 큰비가 내린 뒤 강물이 빠르게 불어나 오래된 다리 근처의 밭 여러 곳이 물에 잠겼다.
박물관은 내년 봄에 유럽과 아시아를 잇던 옛 무역로에 관한 새로운 전시회를 연다.
그녀는 어릴 때 피아노를 배웠지만 자기 곡을 쓰기 시작한 것은 대학에 들어간 뒤였다.
의사들은 어른이라면 매일 밤 적어도 일곱 시간은 자고 날마다 가볍게 산책을 하라고 권한다.
모퉁이에 있는 작은 빵집은 매일 아침 갓 구운 빵을 파는데, 점심때쯤이면 진열대가 대개 텅 빈다.
과학자들은 어떤 새들이 전에 먹이를 준 사람의 얼굴을 알아볼 수 있다는 사실을 밝혀냈다.
우리는 도시의 소음에서 멀리 떨어진 산속의 조용한 마을에서 여름휴가를 보냈다.
시의회는 자전거 도로를 더 만들고 도심의 주차 공간을 줄이기로 결정했다.
외국어를 빨리 배우고 싶다면 실수를 하더라도 매일 그 언어로 말해야 한다.
폭풍 때문에 축구 경기가 취소되었고 팬들은 경기가 시작되기도 전에 집으로 돌아가야 했다.
이웃집은 보호소에서 어린 강아지를 입양했고, 이제 아이들이 학교가 끝나면 강아지를 데리고 공원에 간다.
올해는 가뭄이 든 여름 때문에 수확의 상당 부분이 망가져서 채소 값이 크게 올랐다.
그는 낡은 자전거를 직접 고쳤는데, 오후 한나절 만에 체인과 브레이크와 타이어 두 개를 모두 갈았다.
많은 젊은이들이 공부나 일을 하려고 대도시로 떠나면서 마을의 인구는 조금씩 줄어들고 있다.
도서관은 컴퓨터와 스마트폰 사용법을 배우고 싶어 하는 어르신들을 위해 무료 강좌를 운영한다.
밤사이 기온이 영하로 떨어져 아침에는 호수가 얇은 얼음으로 덮여 있었다.
그 회사는 내년에 새 공장을 열고 약 삼백 명의 직원을 채용하겠다고 발표했다.
우리 형은 어린이 병원에서 간호사로 일한 지 벌써 십 년이 다 되어 간다.
만드는 법은 간단하다. 버터에 양파를 볶다가 쌀과 육수를 넣고 이십 분 동안 천천히 저어 주면 된다.
여름에는 관광객들이 성을 자주 찾지만 겨울이 되면 방들은 문을 닫고 정원도 조용해진다.
선생님은 학생들에게 다음 수업 전까지 소설의 처음 세 장을 읽어 오라고 하셨다.
전기차 가격은 점점 내려가고 있지만 한 번 충전으로 얼마나 멀리 갈 수 있을지 걱정하는 운전자가 아직 많다.
저녁이 되면 온 가족이 식탁에 둘러앉아 국을 먹으며 그날 있었던 일을 이야기했다.
섬에 있던 오래된 등대는 방이 여섯 개뿐인 작은 호텔로 바뀌었다.
여름이 해마다 더 더워지자 이 지역 농민들은 물이 적게 드는 작물을 심기 시작했다.
공연은 거의 세 시간 동안 이어졌고, 마지막에 관객들은 밴드에게 두 곡을 더 불러 달라고 했다.
내가 어렸을 때는 집에 텔레비전이 없어서 저녁이면 라디오를 듣거나 책을 읽었다.
연구진은 학교 스무 곳의 공기 질을 측정한 결과 많은 교실의 환기가 잘 되지 않는다는 것을 알아냈다.
버스 기사는 차를 세우고 무거운 가방을 든 할아버지가 계단을 다 오를 때까지 참을성 있게 기다렸다.
우리 사무실은 항구 근처의 새 건물로 옮겼고, 이제는 내 책상에서 배들이 보인다.
이 축제는 해마다 팔월 말에 열리며 전국 각지에서 방문객들이 찾아온다.
그녀는 외국에 사는 친구에게 긴 편지를 써서 새집과 정원과 이웃들에 대해 자세히 적었다.
산길이 가파르고 좁아서 우리는 천천히 걸으며 자주 멈춰 서서 아래의 골짜기를 내려다보았다.
충분한 잠과 규칙적인 식사, 그리고 적당한 운동이 비싼 비타민보다 더 도움이 될 때가 많다.
그 가게는 육십 년 만에 문을 닫았는데, 주인이 은퇴했고 자식들 중 누구도 가게를 물려받으려 하지 않았기 때문이다.
숲에서 우리는 버섯과 산딸기를 찾았고, 부드러운 땅 위에서 사슴 발자국도 보았다.
정부는 대중교통과 낡은 학교의 보수에 더 많은 돈을 투자할 계획이다.
친구가 시장에서 산 생선과 자기 텃밭에서 기른 채소로 맛있는 저녁을 차려 주었다.
아이들은 학교 앞에 눈사람을 만들고 당근으로 코를 붙인 뒤 낡은 모자를 씌워 주었다.
기술자들은 새 다리를 몇 주 동안 점검한 끝에 마침내 차량 통행을 허가했다.
""",
    "ar": """
تأخر قطار الصباح المتجه إلى المدينة مرة أخرى، فانتظر معظم الركاب على الرصيف البارد وهم يحملون قهوتهم.
زرعت جدتي الطماطم والفاصولياء والبطاطس في حديقة صغيرة خلف البيت لأكثر من أربعين عاما.
بعد المطر الغزير الذي هطل الليلة الماضية ارتفع منسوب النهر بسرعة وغمر عدة حقول قرب الجسر القديم.
سيفتتح المتحف في الربيع المقبل معرضا جديدا عن طرق التجارة القديمة بين أوروبا وآسيا.
تعلمت العزف على البيانو عندما كانت طفلة، لكنها لم تبدأ في تأليف موسيقاها الخاصة إلا في الجامعة.
ينصح الأطباء البالغين بالنوم سبع ساعات على الأقل كل ليلة والمشي قليلا كل يوم.
يبيع المخبز الصغير عند الزاوية الخبز الطازج كل صباح، وعند الظهر تكون الرفوف فارغة في الغالب.
اكتشف العلماء أن بعض الطيور تستطيع التعرف على وجوه الأشخاص الذين أطعموها من قبل.
قضينا عطلة الصيف في قرية هادئة في الجبال بعيدا عن ضجيج المدينة.
قرر مجلس المدينة إنشاء مزيد من مسارات الدراجات وتقليل عدد مواقف السيارات في وسط المدينة.
إذا أردت أن تتعلم لغة أجنبية بسرعة فعليك أن تتحدث بها كل يوم حتى لو ارتكبت أخطاء.
ألغيت مباراة كرة القدم بسبب العاصفة، وطلب من المشجعين العودة إلى بيوتهم قبل بداية اللعب.
تبنى جيراننا كلبا صغيرا من الملجأ، والآن يأخذه الأطفال إلى الحديقة بعد المدرسة.
ارتفعت أسعار الخضروات كثيرا هذا العام لأن الصيف الجاف أتلف جزءا كبيرا من المحصول.
أصلح الدراجة القديمة بنفسه، فاستبدل السلسلة والمكابح والإطارين في عصر يوم واحد.
ينتقل كثير من الشباب إلى المدن الكبيرة للدراسة أو العمل، بينما تفقد القرى سكانها شيئا فشيئا.
تقدم المكتبة دورات مجانية لكبار السن الذين يرغبون في تعلم استخدام الحاسوب والهاتف الذكي.
انخفضت درجة الحرارة في الليل إلى ما دون الصفر، وفي الصباح كانت البحيرة مغطاة بطبقة رقيقة من الجليد.
أعلنت الشركة أنها ستفتتح مصنعا جديدا في العام المقبل وستوظف نحو ثلاثمائة عامل.
يعمل أخي ممرضا في مستشفى الأطفال منذ ما يقارب عشر سنوات.
الوصفة بسيطة: اقل البصل في الزبدة، ثم أضف الأرز والمرق، وحرك ببطء لمدة عشرين دقيقة.
يزور السياح القلعة كثيرا في الصيف، أما في الشتاء فتغلق القاعات وتصبح الحدائق هادئة.
طلبت المعلمة من التلاميذ أن يقرؤوا الفصول الثلاثة الأولى من الرواية قبل الدرس القادم.
أصبحت السيارات الكهربائية أرخص، لكن كثيرا من السائقين ما زالوا قلقين بشأن المسافة التي يمكنهم قطعها بشحنة واحدة.
في المساء كانت العائلة كلها تجتمع حول المائدة لتناول الحساء والحديث عن أحداث اليوم.
تحولت المنارة القديمة في الجزيرة إلى فندق صغير لا يضم سوى ست غرف.
بدأ المزارعون في المنطقة يزرعون محاصيل تحتاج إلى كمية أقل من الماء لأن الصيف يزداد حرارة.
استمر الحفل قرابة ثلاث ساعات، وفي النهاية طلب الجمهور من الفرقة أن تعزف أغنيتين إضافيتين.
عندما كنت صغيرا لم يكن لدينا تلفاز، فكنا نستمع إلى الراديو ونقرأ الكتب في المساء.
قاس الباحثون جودة الهواء في عشرين مدرسة، ووجدوا أن كثيرا من الفصول سيئة التهوية.
أوقف السائق الحافلة وانتظر بصبر حتى صعد الرجل العجوز الدرجات وهو يحمل حقيبته الثقيلة.
انتقل مكتبنا إلى مبنى جديد قرب الميناء، وصار بإمكاني الآن أن أرى السفن من مكتبي.
يقام المهرجان كل عام في أواخر شهر أغسطس ويجذب الزوار من جميع أنحاء البلاد.
كتبت رسالة طويلة إلى صديقتها في الخارج ووصفت لها البيت الجديد والحديقة والجيران.
كان الطريق الجبلي شديد الانحدار وضيقا، فمشينا ببطء وتوقفنا كثيرا لننظر إلى الوادي في الأسفل.
كثيرا ما يكون النوم الجيد والوجبات المنتظمة وقليل من الرياضة أنفع من الفيتامينات الغالية.
أغلق المتجر أبوابه بعد ستين عاما لأن صاحبه تقاعد ولم يرغب أي من أبنائه في إدارته.
وجدنا في الغابة فطرا وتوتا بريا وآثار أقدام غزال على الأرض الطرية.
تخطط الحكومة لاستثمار مزيد من الأموال في النقل العام وفي ترميم المدارس القديمة.
أعدت لنا صديقتي عشاء لذيذا من السمك الذي اشترته من السوق والخضروات التي زرعتها في حديقتها.
صنع الأطفال رجل ثلج أمام المدرسة ووضعوا له جزرة مكان الأنف وقبعة قديمة.
اختبر المهندسون الجسر الجديد عدة أسابيع قبل أن يفتح أخيرا أمام حركة المرور.
""",
}
SENTENCES: dict[str, tuple[str, ...]] = {
    lang: tuple(line.strip() for line in block.strip().splitlines() if line.strip()) for lang, block in _TEXT.items()
}


@dataclass
class CorpusDocument:
    id: str
    lang: str
    text: str
    kind: str  # unique | base | exact | near | junk
    base: str = ""  # for exact / near: the id of the document it copies
    jaccard: float = 0.0  # for exact / near: measured shingle Jaccard with its base
    url: str = ""
    date: str = ""


@dataclass
class MultilingualCorpus:
    documents: list[CorpusDocument] = field(default_factory=list)

    def of(self, lang: str, *kinds: str) -> list[CorpusDocument]:
        return [d for d in self.documents if d.lang == lang and (not kinds or d.kind in kinds)]

    def pairs(self) -> list[CorpusDocument]:
        """The planted copies (``exact`` and ``near``); each names its base."""
        return [d for d in self.documents if d.kind in ("exact", "near")]

    def write_jsonl(self, path: str | Path, truth: bool = False) -> Path:
        """One ``{"id", "text", "url", "date"}`` line per document (plus ``lang, kind, base, jaccard`` with
        ``truth``), in the corpus' (shuffled) order."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = ("id", "text", "url", "date") + (("lang", "kind", "base", "jaccard") if truth else ())
        with open(path, "w", encoding="utf-8") as f:
            for d in self.documents:
                row = asdict(d)
                f.write(json.dumps({k: row[k] for k in keys}, ensure_ascii=False) + "\n")
        return path


def _grams(text: str, ngram: int, char_ngram: int) -> set[tuple[str, ...]]:
    toks, spaceless = shingle_tokens(text)
    k = min(char_ngram if spaceless else ngram, len(toks))
    return {tuple(toks[i : i + k]) for i in range(len(toks) - k + 1)}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


class _Language:
    """Sentence pool, edit vocabulary and document assembly of one language."""

    def __init__(self, lang: str):
        self.lang = lang
        self.sentences = SENTENCES[lang]
        self.sep = _JOIN.get(lang, " ")
        if self.sep:
            words = {w.strip(".,:;!?\u060c") for s in self.sentences for w in s.split()}
        else:
            words = {ch for s in self.sentences for ch in s if ch.isalpha()}
        self.vocab = sorted(w for w in words if w)

    def tokens(self, paragraph: str) -> list[str]:
        return paragraph.split(" ") if self.sep else list(paragraph)

    def join(self, toks: list[str]) -> str:
        return self.sep.join(toks)

    def paragraphs(self, idx: list[int], rng: np.random.Generator) -> list[str]:
        cuts = (
            sorted(
                rng.choice(
                    np.arange(3, len(idx) - 2),
                    size=min(int(rng.integers(0, 3)), 1 + (len(idx) - 6) // 3),
                    replace=False,
                ).tolist()
            )
            if len(idx) >= 6
            else []
        )
        bounds = [0, *cuts, len(idx)]
        return [self.sep.join(self.sentences[i] for i in idx[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def _near_duplicate(
    lang: _Language,
    paragraphs: list[str],
    target: float,
    lo: float,
    rng: np.random.Generator,
    ngram: int,
    char_ngram: int,
) -> tuple[str, float]:
    """Edit random tokens of ``paragraphs`` until J(base, variant) <= target, never accepting an edit that
    takes J below ``lo``."""
    base_text = "\n\n".join(paragraphs)
    base = _grams(base_text, ngram, char_ngram)
    toks = [lang.tokens(p) for p in paragraphs]
    text, j = base_text, 1.0
    for _ in range(400):
        cand = [list(t) for t in toks]
        p = int(rng.choice(len(cand), p=np.array([len(t) for t in cand]) / sum(len(t) for t in cand)))
        pos = int(rng.integers(0, len(cand[p])))
        op = rng.choice(("substitute", "insert", "delete"), p=(0.5, 0.25, 0.25))
        word = lang.vocab[int(rng.integers(0, len(lang.vocab)))]
        if op == "substitute":
            cand[p][pos] = word
        elif op == "insert":
            cand[p].insert(pos, word)
        elif len(cand[p]) > 1:
            del cand[p][pos]
        cand_text = "\n\n".join(lang.join(t) for t in cand)
        cj = _jaccard(base, _grams(cand_text, ngram, char_ngram))
        if cj < lo or cand_text == base_text:
            continue
        toks, text, j = cand, cand_text, cj
        if j <= target:
            break
    return text, j


def _junk(lang: _Language, k: int, rng: np.random.Generator) -> str:
    a, b = (lang.sentences[i] for i in rng.choice(len(lang.sentences), size=2, replace=False))
    if k % 3 == 0:
        return a
    if k % 3 == 1:
        return "\n".join([a] * 10)
    return lang.sep.join([a, b] * 6)


def make_corpus(
    docs_per_language: int = 180,
    languages: tuple[str, ...] = LANGUAGES,
    seed: int = 0,
    near_share: float = 0.25,
    exact_share: float = 0.05,
    junk_share: float = 0.05,
    near_jaccard: tuple[float, float] = (0.8, 0.95),
    ngram: int = 5,
    char_ngram: int = CHAR_NGRAM,
) -> MultilingualCorpus:
    """``docs_per_language`` documents per language: ``near_share`` near-duplicates and ``exact_share`` exact
    copies (each with its base), ``junk_share`` junk, the rest unique. Deterministic in ``seed``."""
    unknown = [x for x in languages if x not in SENTENCES]
    if unknown:
        raise ValueError(f"no sentences for {unknown}; available: {sorted(SENTENCES)}")
    docs: list[CorpusDocument] = []
    for li, code in enumerate(languages):
        rng = np.random.default_rng([seed, li])
        lang = _Language(code)
        n_junk, n_exact = round(junk_share * docs_per_language), round(exact_share * docs_per_language)
        n_near = round(near_share * docs_per_language)
        n_bases = docs_per_language - n_junk - n_exact - n_near
        if n_bases < n_exact + n_near:
            raise ValueError(f"{docs_per_language} documents leave {n_bases} bases for {n_exact + n_near} copies")
        chosen: list[frozenset[int]] = []
        bases: list[list[str]] = []
        limit = 0.25
        while len(bases) < n_bases:
            for _ in range(2000):
                idx = rng.permutation(len(lang.sentences))[: int(rng.integers(6, 13))].tolist()
                s = frozenset(idx)
                if all(len(s & o) <= limit * len(s | o) for o in chosen):
                    break
            else:
                limit += 0.05  # the pool is exhausted at this overlap: allow a little more
                continue
            chosen.append(s)
            bases.append(lang.paragraphs(idx, rng))
        texts = ["\n\n".join(p) for p in bases]
        rows = [CorpusDocument("", code, t, "unique") for t in texts]
        for k in range(n_exact + n_near):
            rows[k].kind = "base"
            if k < n_exact:
                rows.append(CorpusDocument("", code, texts[k], "exact", base=str(k), jaccard=1.0))
            else:
                target = float(rng.uniform(*near_jaccard))
                text, j = _near_duplicate(lang, bases[k], target, near_jaccard[0], rng, ngram, char_ngram)
                rows.append(CorpusDocument("", code, text, "near", base=str(k), jaccard=j))
        rows += [CorpusDocument("", code, _junk(lang, k, rng), "junk") for k in range(n_junk)]
        names = rng.permutation(len(rows))
        for row, name in zip(rows, names):
            row.id = f"{code}-{int(name):05d}"
            site = ("news", "blog", "forum", "wiki")[int(rng.integers(0, 4))]
            row.url = f"https://{site}.example.{_TLD.get(code, 'org')}/{int(rng.integers(2015, 2026))}/{row.id}.html"
            row.date = f"{int(rng.integers(2015, 2026))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
        for row in rows:
            if row.base:
                row.base = rows[int(row.base)].id
        docs += rows
    order = np.random.default_rng([seed, len(languages), 7]).permutation(len(docs))
    return MultilingualCorpus([docs[i] for i in order])


def lsh_clusters(docs: list[CorpusDocument], hasher) -> dict[str, str]:
    """Reference dedup for scoring the corpus: union-find over LSH candidates (documents sharing any band key
    of ``hasher``, a :class:`~data_pipeline.minhash.MinHasher`, are joined), all in memory. Returns
    {document id: its cluster's smallest id}."""
    parent = {d.id: d.id for d in docs}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    buckets: dict[tuple[int, int], list[str]] = {}
    for d in docs:
        for band, key in enumerate(hasher.band_keys(hasher.signature(hasher.shingles(d.text)))):
            buckets.setdefault((band, int(key)), []).append(d.id)
    for ids in buckets.values():
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {x: find(x) for x in parent}
