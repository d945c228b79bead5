"""French customer text, unaccented (USSD and GSM-7). Keys must match ``en.py`` and ``sw.py``."""

from typing import Final

MESSAGES: Final[dict[str, str]] = {
    # Navigation
    "nav_footer": "0 Retour 00 Accueil",
    "nav_more": "Suite",
    "invalid_choice": "Choisissez un numero de la liste.",
    # Home
    "home_title": "Electricite prepayee",
    "menu_buy": "Acheter du courant",
    "menu_token": "Dernier code",
    "menu_meters": "Mes compteurs",
    "menu_check": "Verifier un compteur",
    "menu_language": "Langue",
    "menu_help": "Aide",
    "resume_title": "Reprendre la ou vous etiez?",
    "yes": "Oui",
    "no": "Non",
    # Buying
    "buy_which": "Acheter pour quel compteur?",
    "other_meter": "Autre compteur",
    "enter_meter": "Entrez le numero du compteur:",
    "meter_bad_format": "Un numero de compteur a 11 ou 13 chiffres.",
    "meter_bad_check": "{meter} n'est pas un numero valide. Verifiez les chiffres.",
    "meter_unknown": "Le compteur {meter} est inconnu. Verifiez le numero.",
    "meter_card": "Compteur {meter}\n{name}, {area}",
    "enter_amount": "Montant ({min} a {max}):",
    "amount_bad": "Tapez le montant en chiffres seulement.",
    "refused_below_minimum": "Le minimum est {limit}.",
    "refused_above_maximum": "Le maximum est {limit}.",
    "refused_unknown_meter": "Ce compteur est inconnu.",
    "refused_meter_blocked": "Ce compteur ne peut pas etre recharge. Appelez le distributeur.",
    "refused_purchase_pending": "Un achat pour ce compteur attend le paiement. Finissez-le.",
    "refused_all_to_debt": "La dette du compteur prend ce montant. Achetez au moins {limit}.",
    "refused_unavailable": "Service occupe. Reessayez plus tard.",
    "confirm_title": "Acheter {amount} pour {meter}\n{units} kWh",
    "confirm_breakdown": "Energie {energy}, taxe {tax}, frais {fees}",
    "confirm_debt": "Dette {debt}, reste {remaining}",
    "confirm_pay": "Payer",
    "confirm_cancel": "Annuler",
    "paying": (
        "Vous recevrez une demande de paiement de {amount}. "
        "Entrez votre PIN. Le code arrive par SMS."
    ),
    "cancelled": "Annule. Rien n'a ete preleve.",
    # Last token
    "token_which": "Renvoyer le code pour:",
    "token_latest": "Dernier achat",
    "token_sent": "Votre dernier code du compteur {meter} ({amount}) part par SMS.",
    "token_none": "Aucun code pour ce numero de telephone.",
    # My meters
    "meters_title": "Mes compteurs",
    "meters_empty": "Vous n'avez aucun compteur enregistre.",
    "meters_add": "Ajouter un compteur",
    "meters_full": "Vous avez deja {max} compteurs. Retirez-en un.",
    "meter_actions": "{nickname}: compteur {meter}",
    "meter_buy": "Acheter",
    "meter_remove": "Retirer",
    "enter_nickname": "Nom du compteur {meter} (12 lettres max):",
    "nickname_bad": "Utilisez 1 a 12 lettres ou chiffres.",
    "meter_saved": "{nickname} enregistre.",
    "meter_renamed": "Renomme en {nickname}.",
    "meter_removed": "{nickname} retire.",
    # Check a meter
    "check_result": "Compteur {meter}\n{name}, {area}\nAchat possible de {min} a {max}.",
    # Language
    "language_title": "Choisissez une langue:",
    "language_set": "Langue: francais.",
    # Help
    "help_text": (
        "Achat: {code}\nOu SMS: BUY compteur montant\nTOKEN: dernier code\n"
        "METERS: vos compteurs\nLANG EN, SW ou FR"
    ),
    # Errors
    "error_generic": "Desole, une erreur est survenue. Reessayez.",
    "error_busy": "Service occupe. Reessayez dans une minute.",
    "error_bad_request": "Desole, nous n'avons pas pu lire votre demande.",
    # SMS
    "sms_help": (
        "Pour acheter envoyez BUY compteur montant, ex. BUY 37012345676 500. "
        "TOKEN: votre dernier code. METERS: vos compteurs. LANG EN, SW ou FR: langue."
    ),
    "sms_paying": (
        "Vous recevrez une demande de paiement de {amount} pour le compteur {meter} "
        "({units} kWh). Entrez votre PIN. Le code arrive par SMS."
    ),
    "sms_debt": "Dont {debt} pour la dette du compteur; il restera {remaining}.",
    "sms_amount_negative": (
        "Le montant doit etre plus grand que zero. "
        "Envoyez BUY compteur montant, ex. BUY 37012345676 500."
    ),
    "sms_amount_bad": "Montant incompris. Envoyez BUY compteur montant, ex. BUY 37012345676 500.",
    "sms_meters": "Vos compteurs: {meters}",
    "sms_lang_usage": "Envoyez LANG EN, LANG SW ou LANG FR.",
    # The token SMS (flows/messages/tokens.py): full, terse, with a key change first, with debt
    "token_sms": (
        "Code electricite {token}. {kwh} kWh pour {amount}. Compteur {meter}. Recu {receipt}."
    ),
    "token_sms_short": "Code {token} {kwh}kWh {amount} Cpt {meter} Recu {receipt}",
    "token_sms_key_change": (
        "Nouvelle cle compteur: entrez {kcts} d'abord, puis le code {token}. {kwh} kWh pour"
        " {amount}. Compteur {meter}. Recu {receipt}."
    ),
    "token_sms_key_change_short": (
        "Entrez {kcts} puis {token} {kwh}kWh {amount} Cpt {meter} Recu {receipt}"
    ),
    "token_sms_debt": " Dette recouvree {recovered}, reste {remaining}.",
    "token_sms_debt_short": " Dette {recovered} reste {remaining}",
    "fbe_sms": "Electricite de base gratuite {month}: code {token}. {kwh} kWh. Compteur {meter}.",
}
